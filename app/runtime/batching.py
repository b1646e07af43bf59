"""Dynamic batching: concurrent requests for one model version become one `session.run`.

WHY: on a small model most of a request's cost is fixed (Python, HTTP, one ORT call); running 32
requests as one batch of 32 costs little more than one. How it works, per session key:

- A request that arrives while a run slot of its model is free is dispatched as soon as the event
  loop's current iteration is done (`call_soon`), so a lone client pays no waiting (one loop turn;
  unless `max_delay_s` > 0: then it waits that long for company, as Triton does), while the requests
  already due on the loop (a burst read from the sockets in one go, the clients whose answers just went
  out) join it. Dispatched at once instead, the first of a burst ran alone and took a slot the others
  then queued behind: in-process at c=32 on the rank MLP 69% of runs were of one row (9.7 rows a run),
  now ~0.3% (~30 rows). Up to `max_running` batches of one model run at once (the predict threads): with one at a
  time, a model whose cost per row does not fall with the batch ran on one slot what unbatched
  requests ran on two (a small CNN served 0.55x the requests/s batched), and every wait for a thread
  to wake up stalled the whole queue.
- While a run is in flight, a request that arrives alone does not take the other slot by itself: it
  waits for that run to end or for a second request (`_Queue.company`; not where rows run one by one,
  limit 1, nor with a delay). Over HTTP at c=32 requests trickle in from the sockets, and each that found
  the other slot free ran alone: 48% of the tiny MLP's runs were of one row (10.5 rows a run), now ~20%
  (14.4); requests/s median +2% on it and +5% on the rank MLP (6 A/B pairs, 5 up). Waiting for a full batch
  instead (one slot in effect) left ~2% singles but served 3-8% fewer requests: the second slot
  overlaps one run's trip to its thread and back with the loop's work on the next.
- Requests arriving while the slots are busy queue up; when a run finishes, the queue goes as the
  next batch. A queue that reaches the batch limit is dispatched at once.
- Without a delay, the batch limit adapts between 1 and `max_batch_size`: each queue times its runs
  (per row, by power-of-two size, each run plus DISPATCH_COST_S) and grows the limit only while
  doubling the batch makes a row at least 1 - `GAIN` cheaper; a size found not to pay is tried again
  after `RETRY_AFTER` dispatches. A model whose rows cost as much batched as alone (the CNN: 0.82 ms
  a row alone, 1.1-1.4 ms in a batch of 32 on this CPU, its activations out of cache) then runs its
  requests one by one on all slots, as without batching; a small MLP (5 us a row alone, 0.4 us in
  32) may grow to the maximum. When the event loop, not the run, is the limit (a tiny model at high
  concurrency), few requests arrive during a run and batches stay small whatever the limit.
- Requests are grouped by (outputs asked for, every input's dtype and non-batch dims): shapes are
  never mixed (no padding), so a request's answer does not depend on its batch-mates.
- Unless the graph itself mixes rows: DynamicQuantizeLinear (dynamic INT8) takes one scale over the
  whole tensor, so a row's answer moves with the largest row of its batch (a quantize_dynamic'ed MLP
  with rows scaled by 10^U(-1,2): half the batched answers off by up to 149% of the output's range).
  Such a model is never batched, whatever its settings (`row_coupling_ops`, checked at load); and the
  probe also compares a batched run of rows of very different scales with the same rows run alone
  (`rows_agree`), for what an op list cannot know (e.g. a reduction over the batch axis).
- Only models whose every input and output has a dynamic first axis are batched (`batchable`); the
  split checks that each output really has the batch's rows, else the requests run one by one.
- Each model can have its own `BatchPolicy` (most rows per run, how long to wait for company);
  the Batcher's own policy is the default.
- Batching pays only where a run's fixed cost (the ONNX Runtime call, the hop to a thread) is a
  large part of it: a batch of 8 rows of a small MLP costs about as much as one row. On the CPU a
  CNN's or a transformer's cost per row hardly falls with the batch (measured here: 0.78 -> 0.81 ms
  a row for a small CNN, 0.24 -> 0.21 ms for a 2-layer encoder, batch 1 -> 32). `batching_pays`
  probes a session once, for models without their own batch size, to tell the two apart.
"""

from __future__ import annotations

import asyncio
import mmap
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import onnx

from app.runtime.runs import Lane, RunTimeout
from app.runtime.signature import TensorSpec
from optimizer.latency import row_coupling_in

Feed = dict[str, np.ndarray]
T = TypeVar("T")


def batchable(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> bool:
    """True when every input and output has a dynamic first axis (and the inputs agree on its name)."""
    return unbatchable_reason(inputs, outputs) is None


def unbatchable_reason(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str | None:
    """Why requests of a model with these inputs and outputs cannot share a run along axis 0, None if they can.
    WHY words, not a bool: a model whose upload asked for batching says why it gets none (`batching_note`)."""
    if not inputs or not outputs:
        return "it has no inputs or no outputs"
    for kind, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            if spec.shape is None:
                return f"its {kind} {spec.name!r} has no declared rank, so no batch axis"
            if len(spec.shape) == 0:
                return f"its {kind} {spec.name!r} is a scalar, with no batch axis"
            if isinstance(spec.shape[0], int):
                return f"its {kind} {spec.name!r} has a fixed first axis of {spec.shape[0]}, not a batch axis"
    symbols = sorted({s.shape[0] for s in inputs if s.shape[0] is not None})
    if len(symbols) > 1:
        return f"its inputs' first axes are different dynamic dimensions ({', '.join(map(repr, symbols))})"
    return None


def row_coupling_ops(path: Path) -> list[str]:
    """The op types of the model at `path` (subgraphs and local functions included) that mix a run's rows, by the
    optimizer's rule (optimizer.latency.row_coupling_in), which also times such a variant's batches row by row.

    WHY not onnx.load: it parses every weight too; that memory stayed in the process (a session of a 24 MiB MLP
    then grew RSS by 40 MiB, not 24). The file is mapped and only its nodes are parsed: the weights' pages are
    skipped, never read.
    """
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        nodes: list[onnx.NodeProto] = []
        for number, start, end in _fields(buf, 0, len(buf)):
            if number == 7:  # ModelProto.graph
                nodes.extend(onnx.NodeProto.FromString(buf[s:e]) for n, s, e in _fields(buf, start, end) if n == 1)
            elif number == 25:  # ModelProto.functions
                nodes.extend(onnx.FunctionProto.FromString(buf[start:end]).node)
    return row_coupling_in(nodes)


def _varint(buf: mmap.mmap, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the protobuf message in buf[start:end]."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            pos = _varint(buf, pos)[1]
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            yield tag >> 3, pos, pos + size
            pos += size
        else:  # groups: not in ONNX files
            raise ValueError(f"unexpected protobuf wire type {wire}")


def in_thread(executor: Executor | Lane, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """`fn(*args)` in `executor`; its result or exception in an asyncio future of the running loop. Not run at all
    if the caller went away before a thread got to it (a job queued behind a slow model's runs).

    WHY not `loop.run_in_executor`: that chains the executor's concurrent Future to an asyncio one in both
    directions (state copying, cancellation, a coroutine-function check per call): ~28 us of event-loop CPU
    per call measured here against ~15 us for this, which settles the asyncio future with one
    call_soon_threadsafe. Every unbatched predict pays one hop, a batch one for all its requests.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def job() -> None:
        if future.cancelled():  # a read of its state from this thread: at worst a run nobody waits for
            return
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request, whatever it is
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    executor.submit(job)
    return future


def _settle(future: asyncio.Future, result: object, exc: BaseException | None) -> None:
    if future.done():  # the caller went away (cancelled)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _probe_feed(inputs: list[TensorSpec], rows: int, other_dims: int, scaled: bool = False) -> Feed | None:
    """A feed of `rows` rows (other dynamic dims `other_dims`), or None if an input cannot be made up.
    `scaled`: float row i is 10^(i-1) (0.1, 1, 10, 100, ...), for `rows_agree`."""
    feed = {}
    for spec in inputs:
        if spec.dtype is None or spec.dtype.kind not in "biuf" or spec.shape is None or not spec.shape:
            return None
        dims = [rows] + [d if isinstance(d, int) else other_dims for d in spec.shape[1:]]
        feed[spec.name] = np.ones(dims, spec.dtype)  # ones: a valid token id, mask value and number alike
        if scaled and spec.dtype.kind == "f":
            scales = np.float_power(10.0, np.arange(rows) - 1).astype(spec.dtype)
            feed[spec.name] *= scales.reshape([rows] + [1] * (len(dims) - 1))
    return feed


def rows_agree(session, inputs: list[TensorSpec], *, rows: int = 4, other_dims: int = 16) -> bool | None:  # noqa: ANN001
    """Does one run of `rows` rows of very different scales give each row what it gets alone? None when the
    probe cannot tell (an input it cannot make up, a graph that refuses the made-up rows).

    Beyond float tolerance only: a batch may take other kernels than a single row (blocking, vector widths),
    ~1e-6 relative; a row-coupled op (module doc) is off by a large part of the output's range.
    """
    many = _probe_feed(inputs, rows, other_dims, scaled=True)
    if many is None:
        return None
    try:
        batched = session.run(None, many)
        alone = [session.run(None, {k: v[i:i + 1] for k, v in many.items()}) for i in range(rows)]
    except Exception:  # noqa: BLE001 - made-up rows a graph refuses: no answer either way
        return None
    for j, value in enumerate(batched):
        if value.ndim == 0 or value.shape[0] != rows:
            return False  # not split by rows: batching would run these one by one anyway
        for i in range(rows):
            mine, theirs = value[i:i + 1], alone[i][j]
            if mine.shape != theirs.shape:
                return False
            if mine.dtype.kind not in "fc":
                if not np.array_equal(mine, theirs):
                    return False
                continue
            scale = float(np.nanmax(np.abs(theirs), initial=0.0, where=np.isfinite(theirs)))
            if not np.allclose(mine, theirs, rtol=1e-3, atol=1e-4 * max(scale, 1e-3), equal_nan=True):
                return False
    return True


def _run_time(session, feed: Feed) -> float:  # noqa: ANN001
    started = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - started


def batching_pays(session, inputs: list[TensorSpec], *, rows: int = 8, other_dims: int = 16,  # noqa: ANN001
                  max_single_s: float = 0.002, repeat: int = 7) -> bool:
    """True when one run of `rows` rows costs at most half of `rows` single runs (timed on made-up inputs)
    and gives each row what it gets alone (`rows_agree`).

    The two are timed in turn, best of `repeat` each, so that a burst of load on a shared machine
    slows both rather than tipping the answer. A single run longer than `max_single_s` is
    compute-bound: not probed further, not batched. Any failure (an input that cannot be made up, a
    graph that refuses ones) means no batching.
    """
    one, many = _probe_feed(inputs, 1, other_dims), _probe_feed(inputs, rows, other_dims)
    if one is None or many is None:
        return False
    try:
        # The warm-up (first runs allocate) says no only when it is far over: a large model's first request does
        # not wait for more runs. Not at 5x: on a loaded host a preempted run takes 4-5x its CPU time, and a fresh
        # MLP session's first run went over 10 ms in 28 of 2000 probes at load 13-17, turning batching off for good.
        if _run_time(session, one) > 25 * max_single_s:
            return False
        single = min(_run_time(session, one) for _ in range(2))
        if single > max_single_s:
            return False
        _run_time(session, many)
        batched = float("inf")
        for _ in range(repeat):
            single = min(single, _run_time(session, one))
            batched = min(batched, _run_time(session, many))
        return batched <= 0.5 * rows * single and rows_agree(session, inputs, other_dims=other_dims) is True
    except Exception:  # noqa: BLE001 - a probe that fails only means "do not batch"
        return False


@dataclass(frozen=True)
class BatchPolicy:
    """How one model is batched. `max_batch_size` 1 means each request runs alone."""

    max_batch_size: int = 32
    max_delay_s: float = 0.0


class Waiter(Protocol):
    """Where a queued request's outputs go: an asyncio future, or anything that takes them the same way."""

    def done(self) -> bool: ...
    def set_result(self, result: list[np.ndarray], /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass(slots=True)
class _Request:
    feed: Feed
    rows: int
    future: Waiter
    queued_at: float


GAIN = 0.9  # the batch limit doubles only while a row costs at most this much of a row in half the batch
RETRY_AFTER = 50  # dispatches after which a size found not to pay is tried again (noise; the load changes)
_CREEP = 1.05  # a size's timing is the least seen, raised by this factor at each new timing
# What a dispatch costs beyond its run, which a batch shares among its rows: the hop to a predict thread
# and back, the futures, the split (~50 us of a small MLP's ~55 us unbatched request path, measured here).
DISPATCH_COST_S = 50e-6


def _bucket(rows: int) -> int:
    """The power of two at or below `rows`: timings are kept per bucket."""
    return 1 << (rows.bit_length() - 1)


def batch_limit(timings: dict[int, tuple[float, int]], dispatches: int, most: int) -> int:
    """Rows the next batch may take, from a queue's timings (power-of-two size -> (seconds per row, the
    dispatch count when timed)): doubles from 1 while a row gets at least 1 - GAIN cheaper; the first size
    not timed is the one tried, and a size found not to pay is tried again after RETRY_AFTER dispatches;
    never above `most`. Before any timing, `most`."""
    if not timings:
        return most
    size = 1
    while size < most:
        here, bigger = timings.get(size), timings.get(2 * size)
        if here is None:
            return size
        if bigger is None:
            return min(2 * size, most)
        if bigger[0] > GAIN * here[0]:  # does not pay; unless that was found long ago (one noisy run?): try again
            return min(2 * size, most) if dispatches - bigger[1] > RETRY_AFTER else size
        size *= 2
    return most


@dataclass
class _Queue:
    """The waiting requests of one session key, grouped by shape signature (insertion = age order)."""

    policy: BatchPolicy
    groups: dict[Hashable, list[_Request]] = field(default_factory=dict)
    running: int = 0  # batches of this key in the executor now
    timer: asyncio.Handle | None = None  # a dispatch scheduled (call_soon, or call_later for a delay)
    dispatches: int = 0
    # power-of-two batch size -> (seconds per row, a creeping floor; the dispatch count when last timed)
    timings: dict[int, tuple[float, int]] = field(default_factory=dict)

    def depth(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def limit(self) -> int:
        """A model told to wait for company (`max_delay_s`) has chosen to batch: its maximum. Else adaptive."""
        if self.policy.max_delay_s > 0:
            return self.policy.max_batch_size
        return batch_limit(self.timings, self.dispatches, self.policy.max_batch_size)

    def may_start(self, group: list[_Request], max_running: int) -> bool:
        """May `group` take a run slot now? When one is free and no run is in flight, or, beside a run in
        flight, with 2 rows or more, or where rows run one by one (limit 1): a lone row rather waits for that
        run to end (module doc). A model with a delay waits for company its own way (`max_delay_s`)."""
        if self.running >= max_running:
            return False
        return (self.running == 0 or len(group) > 1 or group[0].rows > 1 or self.policy.max_delay_s > 0
                or self.limit() == 1)

    def timed(self, rows: int, seconds: float) -> None:
        """Keep a floor per size that creeps up: waits (for the GIL, a core) only ever add to a run's time,
        so one slow run must not count, but a machine that got slower is followed within a few runs."""
        bucket = _bucket(rows)
        per_row = seconds / rows
        old = self.timings.get(bucket)
        if old is None:
            # A size's first run allocates for its shapes: it may say "pays", not yet "does not pay" (stale at once).
            self.timings[bucket] = (per_row, self.dispatches - RETRY_AFTER - 1)
        else:
            self.timings[bucket] = (min(per_row, old[0] * _CREEP), self.dispatches)


class Batcher:
    """Gathers concurrent `run` calls per session key into batched `session.run` calls in `executor`."""

    def __init__(self, executor: Executor, *, max_batch_size: int = 32, max_delay_s: float = 0.0,
                 max_running: int = 2,
                 observe: Callable[[Hashable, int, int, list[float]], None] | None = None) -> None:
        self.executor = executor
        self.default = BatchPolicy(max_batch_size, max_delay_s)
        self.max_running = max_running
        # observe(key, queue depth, batch size, queue seconds of each request) after each dispatch
        self.observe = observe
        self._queues: dict[Hashable, _Queue] = {}

    async def run(self, key: Hashable, session, names: list[str] | tuple[str, ...], feed: Feed,  # noqa: ANN001
                  policy: BatchPolicy | None = None) -> list[np.ndarray]:
        """`session.run(names, feed)`, possibly as part of a larger batch. Raises what ONNX Runtime raises.

        `policy` is the model's own (None: the default); the latest one given for a key applies.
        """
        future = asyncio.get_running_loop().create_future()
        self.enqueue(key, session, names, feed, policy, future)
        return await future

    def enqueue(self, key: Hashable, session, names: list[str] | tuple[str, ...], feed: Feed,  # noqa: ANN001
                policy: BatchPolicy | None, waiter: Waiter) -> None:
        """`run` without a coroutine: the outputs (or the exception) go to `waiter`, on the event loop, once the
        request's batch has run; a `waiter` already done by then (its caller went away) is skipped, and if it was
        not dispatched yet, not run. WHY: the short HTTP path (app/http_protocol.py) answers a batched request from
        its batch's callback, without a task, a future and a chain of coroutines per request."""
        rows = next(iter(feed.values())).shape[0]
        # (np.dtype itself, not its .str: that builds a new string per call; equal dtypes hash and compare equal)
        signature = (names if type(names) is tuple else tuple(names),
                     tuple([(k, v.dtype, v.shape[1:]) for k, v in feed.items()]))
        request = _Request(feed, rows, waiter, time.perf_counter())
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(policy or self.default)
        elif policy is not None:
            queue.policy = policy
        group = queue.groups.setdefault(signature, [])
        group.append(request)
        if queue.may_start(group, self.max_running):
            if queue.policy.max_delay_s <= 0:
                if queue.timer is None:  # after the requests already due in this loop iteration (module doc)
                    queue.timer = asyncio.get_running_loop().call_soon(self._dispatch, key, session)
            elif sum(r.rows for r in group) < queue.limit():
                if queue.timer is None:
                    queue.timer = asyncio.get_running_loop().call_later(queue.policy.max_delay_s, self._dispatch,
                                                                        key, session)
            else:
                self._dispatch(key, session)

    # -- on the event loop --------------------------------------------------------------------------

    def _dispatch(self, key: Hashable, session) -> None:  # noqa: ANN001
        """Fill the free run slots, each with the oldest group's first rows up to the batch limit."""
        queue = self._queues.get(key)
        if queue is None:
            return
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        while queue.groups and queue.may_start(next(iter(queue.groups.values())), self.max_running):
            self._dispatch_one(key, queue, session)

    def forget(self, predicate: Callable[[Hashable], bool]) -> None:
        """Drop the idle queues (and what they learnt) of keys that match: their model version is gone."""
        for key in [k for k, q in self._queues.items() if predicate(k) and not q.running and not q.groups]:
            del self._queues[key]

    def _dispatch_one(self, key: Hashable, queue: _Queue, session) -> None:  # noqa: ANN001
        signature, group = next(iter(queue.groups.items()))
        taken, rows, gone = 0, 0, 0
        limit = queue.limit()
        for request in group:  # the oldest first, up to the limit (at least one)
            if taken > gone and rows + request.rows > limit:
                break
            taken += 1
            if request.future.done():  # its caller went away (a client that disconnected): not run
                gone += 1
            else:
                rows += request.rows
        if taken == len(group):
            batch = group
            del queue.groups[signature]
        else:
            batch = group[:taken]
            del group[:taken]
        if gone:
            batch = [r for r in batch if not r.future.done()]
            if not batch:
                return
        queue.running += 1
        queue.dispatches += 1
        now = time.perf_counter()
        try:
            if self.observe is not None:
                self.observe(key, queue.depth(), rows, [now - r.queued_at for r in batch])
            future = in_thread(self.executor, _run_timed, session, signature[0], batch)
        except Exception as exc:  # noqa: BLE001 - e.g. the executor shut down: answer, never leave them waiting
            # WHY: a dispatch may run from call_soon, where a raise reaches only the loop's log, not the callers.
            queue.running -= 1
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        future.add_done_callback(lambda f: self._finished(key, session, batch, f, rows))

    def _finished(self, key: Hashable, session, batch: list[_Request], done: asyncio.Future,  # noqa: ANN001
                  rows: int) -> None:
        exc = done.exception()
        results, seconds = (None, 0.0) if exc is not None else done.result()
        queue = self._queues[key]
        queue.running -= 1
        if exc is None and rows and queue.dispatches > self.max_running:
            # (Not a batch of only empty requests, 0-row tensors ONNX Runtime runs: it has no cost per row.)
            # The run as timed in its thread, plus what a dispatch costs outside it. Not dispatch to answer:
            # under load that is mostly waiting for the GIL and the event loop, noise that had a small MLP's
            # limit fall back to 1 half the time. Not the first run of each slot: a session's first runs
            # allocate (an MLP's took 6 ms, not 50 us).
            queue.timed(rows, seconds + DISPATCH_COST_S)
        # The next batch first: it runs in its thread while this one's requests are answered (a waiter of `enqueue`
        # writes its answer from here).
        self._dispatch(key, session)
        for i, request in enumerate(batch):
            waiter = request.future
            if waiter.done():  # the caller went away
                continue
            outcome = exc if exc is not None else results[i]
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)


# -- in the executor ---------------------------------------------------------------------------------


def _run_timed(session, names: tuple[str, ...], batch: list[_Request]) -> tuple[list, float]:  # noqa: ANN001
    """`_run_batch` and how long it took in this thread."""
    started = time.perf_counter()
    return _run_batch(session, names, batch), time.perf_counter() - started


def _run_batch(session, names: tuple[str, ...], batch: list[_Request]) -> list[list[np.ndarray] | Exception]:  # noqa: ANN001
    """One run for the whole batch, split back per request. Each request gets outputs or its own error."""
    if len(batch) == 1:
        return [_run_alone(session, names, batch[0].feed)]
    feed = {name: np.concatenate([r.feed[name] for r in batch]) for name in batch[0].feed}
    total = sum(r.rows for r in batch)
    try:
        values = session.run(names, feed)
    except RunTimeout as exc:  # not again one by one: each would take as long
        return [exc for _ in batch]
    except Exception:  # noqa: BLE001 - one bad request must not fail its batch-mates: run each alone
        return [_run_alone(session, names, r.feed) for r in batch]
    if any(v.ndim == 0 or v.shape[0] != total for v in values):
        # The graph's batch axis is not the first axis of every output after all: no safe split.
        return [_run_alone(session, names, r.feed) for r in batch]
    # Python ints as bounds: slicing with numpy integers costs twice as much, in this thread but under the GIL
    results, start = [], 0
    for request in batch:
        end = start + request.rows
        results.append([v[start:end] for v in values])
        start = end
    return results


def _run_alone(session, names: list[str] | tuple[str, ...], feed: Feed) -> list[np.ndarray] | Exception:  # noqa: ANN001
    try:
        return session.run(names, feed)
    except Exception as exc:  # noqa: BLE001 - handed back to that request only
        return exc

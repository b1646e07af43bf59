"""Runs with a time limit, and a cap on one model's runs at once: one slow model must not stall the others.

WHY: every model shares the predict threads. A model whose run never ends (a Loop with an astronomic trip
count) held a thread for ever, and a few requests to it held them all: every other model's predict
waited behind it. Two guards:

- `Watchdog`: each run gets its own `RunOptions`; a watchdog thread sets `terminate` on those past the
  limit, and ONNX Runtime stops the run between kernels (also between a Loop's iterations: "Exiting due
  to terminate flag being set to true") and frees the thread. The run raises `RunTimeout`. Checked once
  per `period` (a tenth of the limit, at most 1 s), so a run stops within the limit plus that; the thread
  starts with the first run and ends with its Watchdog (its service).
- `Lanes`: at most `limit` runs of one model in the executor at once; the executor has one thread more
  than that (app/services/container.py), so a model that takes all its slots still leaves a thread to the
  others. Its other requests queue per model, in order.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor

import numpy as np
import onnxruntime as ort

from optimizer.errors import first_line
from optimizer.latency import run_row_by_row

log = logging.getLogger(__name__)
#: ONNX Runtime's severity "fatal": it would log its own error line for every run the watchdog stops (and ORT
#: reads the level when a run starts, so it cannot be raised at the moment of `terminate`); a run that fails for
#: another reason is logged here instead, with the same first line ORT printed.
_ORT_QUIET = 4


class RunTimeout(Exception):  # noqa: N818 - "RunTimeoutError" reads worse and it is not the service's error type
    """A run stopped by the watchdog after `limit_s` seconds."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"the run took longer than {limit_s:g} s and was stopped")
        self.limit_s = limit_s


class Watchdog:
    """Stops `session.run` calls that take longer than `limit_s` (0: no limit)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.period = min(1.0, limit_s / 10)
        self._running: dict[int, tuple[float, ort.RunOptions]] = {}  # id(options) -> (deadline, options)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self, session, names: list[str] | None, feed: dict[str, np.ndarray]) -> list:  # noqa: ANN001
        """`session.run(names, feed)`, stopped with RunTimeout past the limit."""
        if self.limit_s <= 0:
            return session.run(names, feed)
        if self._thread is None:
            self._start()
        options = ort.RunOptions()
        options.log_severity_level = _ORT_QUIET
        key = id(options)
        self._running[key] = (time.monotonic() + self.limit_s, options)  # no lock: one dict operation
        try:
            return session.run(names, feed, options)
        except Exception as exc:
            if options.terminate:
                raise RunTimeout(self.limit_s) from None
            log.warning("a predict run failed: %s", first_line(exc))
            raise
        finally:
            del self._running[key]

    def running(self) -> int:
        """How many runs are inside ONNX Runtime under this watchdog now."""
        return len(self._running)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=_watch, args=(weakref.ref(self), self.period),
                                                name="predict-watchdog", daemon=True)
                self._thread.start()


def _watch(ref: weakref.ref[Watchdog], period: float) -> None:
    """The watchdog thread: it holds no reference between checks, and ends with its Watchdog."""
    while True:
        time.sleep(period)
        watchdog = ref()
        if watchdog is None:
            return
        running = watchdog._running.copy().values()  # one dict operation: the runs' threads change it meanwhile
        del watchdog
        now = time.monotonic()
        for deadline, options in running:
            if deadline <= now:
                options.terminate = True  # read by ONNX Runtime's run in its thread: made for this


class Limited:
    """A session whose `run` goes through a watchdog: what the batcher and the probes call."""

    __slots__ = ("session", "watchdog")

    def __init__(self, session, watchdog: Watchdog) -> None:  # noqa: ANN001 - onnxruntime.InferenceSession
        self.session = session
        self.watchdog = watchdog

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list:
        return self.watchdog.run(self.session, names, feed)


class RowByRow(Limited):
    """A session whose graph mixes the rows of a run: a request of several rows runs each row alone, stacked after.

    WHY: dynamic INT8's DynamicQuantizeLinear takes one scale over every row of a run, so a row's answer depended on
    the other rows its client sent with it (MiniLM INT8: cosine 0.989 between a row alone and inside 8 rows, under
    the 0.99 gate), while the variant's accuracy was proven one row at a time. Such a model is never batched across
    requests (batching.row_coupling_ops); this keeps one request's rows apart too, at the cost of one run per row.
    """

    __slots__ = ()

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list:
        return run_row_by_row(lambda rows: self.watchdog.run(self.session, names, rows), feed)


class Lanes:
    """At most `limit` runs of one key in the executor at once; the others queue per key, first come first served.

    WHY in the threads, not on the event loop: a thread that ends a run takes its key's next queued job at once,
    as the executor's own queue did. Admitting the next run from the event loop instead left the thread idle for a
    loop turn after each run: a tiny MLP at 8 concurrent callers served ~half the requests/s. And a slot is freed
    when its run really ends, not when a caller that went away (a disconnect) stops waiting.
    """

    def __init__(self, executor: Executor, limit: int) -> None:
        self.executor = executor
        self.limit = limit
        self._lock = threading.Lock()
        self._running: dict[Hashable, int] = {}
        self._queued: dict[Hashable, deque[Callable[[], None]]] = {}

    def lane(self, key: Hashable) -> Lane:
        return Lane(self, key)

    def running(self, key: Hashable) -> int:
        return self._running.get(key, 0)

    def queued(self, key: Hashable) -> int:
        return len(self._queued.get(key, ()))

    def submit(self, key: Hashable, job: Callable[[], None]) -> None:
        with self._lock:
            running = self._running.get(key, 0)
            if running >= self.limit:
                self._queued.setdefault(key, deque()).append(job)
                return
            self._running[key] = running + 1
        try:
            self.executor.submit(self._drain, key, job)
        except BaseException:
            with self._lock:
                self._done(key)
            raise

    def _drain(self, key: Hashable, job: Callable[[], None] | None) -> None:
        while job is not None:
            job()
            with self._lock:
                queue = self._queued.get(key)
                if queue:
                    job = queue.popleft()
                    if not queue:
                        del self._queued[key]
                else:
                    job = None
                    self._done(key)

    def _done(self, key: Hashable) -> None:
        running = self._running[key] - 1
        if running:
            self._running[key] = running
        else:
            del self._running[key]


class Lane:
    """One key's way into `Lanes`, with an executor's `submit` (what batching.in_thread calls)."""

    __slots__ = ("key", "lanes")

    def __init__(self, lanes: Lanes, key: Hashable) -> None:
        self.lanes = lanes
        self.key = key

    def submit(self, job: Callable[[], None]) -> None:
        self.lanes.submit(self.key, job)

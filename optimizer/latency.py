"""Time models side by side on the provider that serves, so the ratio between them can be trusted.

A speed-up claimed from two timings taken minutes apart on a shared 2-core machine is noise. So every
model of a comparison gets its own session (same settings, from `create_session`), is warmed up, and
then all are run *interleaved*: one run of each per round, rotating which goes first, until enough
rounds and `target_seconds` have passed. Whatever slows the machine down slows every model alike.

Idle ONNX Runtime threads spin and steal time from the other session on the same cores (an identical
model measured 1.38x "faster"), so spinning is turned off for every measurement. Absolute numbers are
then slightly conservative against a spinning serving session; the ratio is what they are for.

Interleaving alone does not make two p50s comparable on a loaded machine: the same bytes in two
sessions still measured 0.85-1.22x (magika, load 6-7). Measured why (tests.models.cnn, busy processes on
both cores): a run either runs through or is preempted for other processes' time slices. 27-41% of runs
took 4-5x the fastest wall time (1.5 vs 5.6-8.6 ms) for the same CPU time (1.59 vs 1.67 ms), with one
intra-op thread as with two (so not thread pools competing; spinning is off anyway). With near half
the runs in each mode a p50 falls in either mode on a few runs' luck: 0.07x-16x between identical
sessions. An opening-order or position effect did not reproduce (first vs last in the cycle: 0/12,
then 5/12 trials). So a measurement can time an A/A control (the first model opened again, last, as
an independent session) and `paired_ratio` compares two models round by round: what the control's
ratio to the first model shows is the noise of that very run.

A batch is timed the way the service runs it: a variant whose graph mixes the rows of a run
(`row_coupling_in`, dynamic INT8) is served one row per run (app.runtime.runs.RowByRow), so its batched
figure is `batch` runs of one row, not one batched run (MiniLM INT8 at batch 8: 1.81x the original as one
run, 1.41x as served).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from optimizer.errors import OptimizerError, first_line
from optimizer.runtime import SessionSettings, create_session, session_provider

ModelSource = bytes | str | Path
#: The name under which `measure(..., aa_control=True)` reports the first model's second session.
AA_CONTROL = "A/A control"
#: Called after a batch size's timing with (batch, stats); True times that batch size once more, as long again (at
#: most `extensions` times).
ExtendIf = Callable[[int, "dict[str, LatencyStats]"], bool]


#: Ops whose output for one row depends on every row of the run. DynamicQuantizeLinear computes one scale and zero
#: point over its whole input; ONNX Runtime's contrib DynamicQuantizeMatMul (what its optimizer fuses
#: DynamicQuantizeLinear + MatMulInteger into, found in files saved at the extended level) and DynamicQuantizeLSTM
#: quantize their input the same way. (QAttention and MatMulIntegerToFloat take their scales as inputs: from a
#: DynamicQuantizeLinear in what quantize_dynamic writes, which this set already catches.)
ROW_COUPLING_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})


def row_coupling_in(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    """The op types among `nodes` and their subgraphs that mix a run's rows (ROW_COUPLING_OPS).

    The one rule for both sides: the service never batches such a variant and runs a request's rows one by one
    (app.runtime.batching reads the nodes from the file), and the benchmark times its batches row by row.
    """
    pending = list(nodes)
    found: set[str] = set()
    while pending:
        node = pending.pop()
        if node.op_type in ROW_COUPLING_OPS:
            found.add(node.op_type)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                pending.extend(attribute.g.node)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                pending.extend(node for graph in attribute.graphs for node in graph.node)
    return sorted(found)


def model_row_coupling(model: onnx.ModelProto) -> list[str]:
    """`row_coupling_in` a model's graph and its local functions."""
    return row_coupling_in([*model.graph.node, *(node for function in model.functions for node in function.node)])


class BenchmarkError(OptimizerError):
    """A model could not be timed: its session could not be created, or it refused the inputs."""


class BudgetExceededError(BenchmarkError):
    """The caller's deadline passed before the measurement could start."""


@dataclass
class LatencyStats:
    """One model's latency at one batch size, from one interleaved measurement."""

    batch: int  # samples per run
    runs: int  # timed runs (warm-up excluded)
    session_create_ms: float
    warmup_runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    # batch * 1000 / p50_ms: the median, like the selection rule, so one stall does not move it.
    throughput_per_s: float
    provider: str  # what the session really ran on ("cpu" or "cuda"), not what was asked for
    deadline_hit: bool = False  # the caller's deadline cut the measurement short of min_runs/target_seconds
    row_by_row: bool = False  # each run was `batch` runs of one row, as the service runs a graph that mixes rows
    extended: bool = False  # timed a second time as long because `extend_if` asked for it
    # this model's time in each round, in round order: entry i pairs with entry i of every model of the same call
    round_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["round_ms"]  # thousands of numbers; the percentiles and `paired_ratio` say what they hold
        return out


@dataclass(frozen=True)
class Ratio:
    """How many times faster a model ran than a base, from the rounds' paired runs (> 1: faster)."""

    median: float
    low: float  # 95% confidence bounds of the median
    high: float
    rounds: int

    def excludes(self, value: float) -> bool:
        """True when `value` lies outside the interval (an A/A control excluding 1.0: the run's timing is biased)."""
        return not self.low <= value <= self.high

    def to_dict(self) -> dict[str, float | int]:
        return {"median": round(self.median, 4), "low": round(self.low, 4), "high": round(self.high, 4),
                "rounds": self.rounds}


#: Fewest blocks the interval of `paired_ratio` is drawn from: the extremes of 6 independent block medians already
#: cover the median 1 - 2 / 2**6 = 97% of the time; with fewer, the interval is the extremes and covers less.
MIN_BLOCKS = 6


def sign_test_rank(m: int, confidence: float = 0.95) -> int:
    """The largest k such that the (k+1)-th smallest and (k+1)-th largest of `m` independent values bound their
    median with at least `confidence` (exact binomial sign test; 0 when even the extremes fall short)."""
    k, tail = 0, 1 / 2**m  # tail = P(Binomial(m, 1/2) <= k)
    while k + 1 < m / 2:
        next_tail = tail + math.comb(m, k + 1) / 2**m
        if 1 - 2 * next_tail < confidence:
            break
        k, tail = k + 1, next_tail
    return k


def paired_ratio(base: LatencyStats, other: LatencyStats) -> Ratio:
    """Median over rounds of base's run / other's run in the same round, with a 95% confidence interval.

    WHY paired rather than two p50s: both runs of a round see the same load, so a burst that slows
    a round cancels in its ratio instead of landing in one model's tail.
    WHY the interval comes from blocks of consecutive rounds: load comes in spells longer than a round (another
    process's burst, a load level that drifts over seconds), so neighbouring rounds are not independent and an
    interval that counts every round as independent evidence is too narrow. A reviewer's A/A controls (the same
    bytes timed against themselves) read 1.334x [1.036-1.560] and a served figure 2.30x [1.81-3.02] for a variant
    re-measured at 1.71-1.78x; on real round series recorded here under load 9-15 the per-round interval covered
    the long-run median of 40-round windows 86-90% of the time. So the rounds are cut into about sqrt(n)
    contiguous blocks (at least MIN_BLOCKS when there are rounds enough), each block's median ratio is one value,
    and the interval is the distribution-free one for a median of those (exact sign-test order statistics):
    blocks longer than a load spell are nearly independent where rounds are not. Run times are skewed and
    bimodal (a run runs through or is preempted), so no normal model of them is assumed. The median reported is
    still the median of all rounds, and the interval is widened to hold it.
    """
    n = min(len(base.round_ms), len(other.round_ms))
    if n == 0:
        raise ValueError("paired_ratio needs stats with round times from the same measurement")
    ratios = np.asarray(base.round_ms[:n]) / np.asarray(other.round_ms[:n])
    median = float(np.median(ratios))
    length = max(1, min(math.ceil(math.sqrt(n)), n // MIN_BLOCKS))
    blocks = np.sort([np.median(block) for block in np.array_split(ratios, n // length)])
    k = sign_test_rank(len(blocks))
    return Ratio(median, min(float(blocks[k]), median), max(float(blocks[-1 - k]), median), n)


@dataclass
class _Opened:
    session: ort.InferenceSession
    create_ms: float
    provider: str



def _open(models: Mapping[str, ModelSource], settings: SessionSettings | None,
          aa_control: bool = False) -> dict[str, _Opened]:
    """One session per model with spinning off, timing how long each takes to create.

    The A/A control is opened last: if opening order mattered, it lies between the first model and
    its control, so the control's spread covers it.
    """
    settings = dataclasses.replace(settings or SessionSettings(), allow_spinning=False)
    if aa_control:
        if AA_CONTROL in models:
            raise ValueError(f"{AA_CONTROL!r} is reserved for the A/A control")
        models = {**models, AA_CONTROL: next(iter(models.values()))}
    opened = {}
    for name, model in models.items():
        start = time.perf_counter_ns()
        try:
            session = create_session(model, settings)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise BenchmarkError(f"model {name!r} cannot be loaded for timing: {first_line(exc)}") from None
        create_ms = (time.perf_counter_ns() - start) / 1e6
        opened[name] = _Opened(session, create_ms, session_provider(session))
    return opened


def run_row_by_row(run: Callable[[Mapping[str, np.ndarray]], list], feed: Mapping[str, np.ndarray]) -> list:
    """`run(feed)` as one run per row of axis 0, the answers stacked: how the service (app.runtime.runs.RowByRow)
    runs a graph that mixes rows, and how it is timed here. One row, or inputs that do not share a first axis: as
    sent."""
    rows = {value.shape[0] if value.ndim else -1 for value in feed.values()}
    count = rows.pop() if len(rows) == 1 else -1
    if count <= 1:
        return run(feed)
    answers = [run({key: value[i:i + 1] for key, value in feed.items()}) for i in range(count)]
    return [np.concatenate(outputs) for outputs in zip(*answers, strict=True)]


def _run(name: str, session: ort.InferenceSession, feed: Mapping[str, np.ndarray], row_by_row: bool = False) -> None:
    """One run of `feed`; `row_by_row`: as `run_row_by_row` (slicing and stacking included: part of what serves)."""
    try:
        if row_by_row:
            run_row_by_row(lambda rows: session.run(None, rows), feed)
        else:
            session.run(None, feed)
    except Exception as exc:  # noqa: BLE001
        expected = [(i.name, i.shape) for i in session.get_inputs()]
        raise BenchmarkError(
            f"model {name!r} refused the timing inputs {sorted(feed)}: {first_line(exc)}. "
            f"It expects {expected}"
        ) from None


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _rounds(opened: dict[str, _Opened], feed: Mapping[str, np.ndarray], times: dict[str, list[int]], *,
            min_runs: int, max_runs: int, target_seconds: float, deadline: float | None,
            row_by_row: Collection[str] = ()) -> bool:
    """Append one run of each model per round to `times`; True when the deadline cut it short."""
    names = list(opened)
    first = len(times[names[0]])
    target_ns = int(target_seconds * 1e9)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one model's run would be charged to that model alone
    try:
        start = time.perf_counter_ns()
        for rounds in range(max_runs):
            if rounds >= min_runs and time.perf_counter_ns() - start >= target_ns:
                return False
            if rounds >= 1 and _past(deadline):
                return True
            k = (first + rounds) % len(names)
            for name in names[k:] + names[:k]:  # rotate who goes first: no model always runs on a warm cache
                session = opened[name].session
                t0 = time.perf_counter_ns()
                _run(name, session, feed, name in row_by_row)
                times[name].append(time.perf_counter_ns() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return False


def _stats(opened: dict[str, _Opened], times: dict[str, list[int]], batch: int, warmup: int, deadline_hit: bool,
           extended: bool, row_by_row: Collection[str] = ()) -> dict[str, LatencyStats]:
    stats = {}
    for name, o in opened.items():
        ms = np.asarray(times[name], dtype=np.float64) / 1e6
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        stats[name] = LatencyStats(
            batch=batch, runs=len(ms), session_create_ms=o.create_ms, warmup_runs=warmup,
            p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=float(ms.mean()),
            throughput_per_s=batch * 1000.0 / p50 if p50 > 0 else 0.0,
            provider=o.provider, deadline_hit=deadline_hit, extended=extended, round_ms=ms.tolist(),
            row_by_row=batch > 1 and name in row_by_row,
        )
    return stats


def _time_interleaved(opened: dict[str, _Opened], feed: Mapping[str, np.ndarray], batch: int, *, min_runs: int,
                      max_runs: int, target_seconds: float, warmup: int, deadline: float | None,
                      extend_if: ExtendIf | None = None, row_by_row: Collection[str] = (),
                      extensions: int = 1) -> dict[str, LatencyStats]:
    for name, o in opened.items():
        for _ in range(warmup):
            _run(name, o.session, feed, name in row_by_row)
    times: dict[str, list[int]] = {name: [] for name in opened}
    hit = _rounds(opened, feed, times, min_runs=min_runs, max_runs=max_runs, target_seconds=target_seconds,
                  deadline=deadline, row_by_row=row_by_row)
    stats = _stats(opened, times, batch, warmup, hit, extended=False, row_by_row=row_by_row)
    # at most `extensions` times, each as long again: bounded, so a run too noisy to decide ends with "not proven",
    # not a loop
    for _ in range(extensions):
        if extend_if is None or hit or _past(deadline) or not extend_if(batch, stats):
            break
        hit = _rounds(opened, feed, times, min_runs=min_runs, max_runs=max_runs, target_seconds=target_seconds,
                      deadline=deadline, row_by_row=row_by_row)
        stats = _stats(opened, times, batch, warmup, hit, extended=True, row_by_row=row_by_row)
    return stats


def _check_counts(min_runs: int, max_runs: int, warmup: int) -> None:
    if not 1 <= min_runs <= max_runs or warmup < 0:
        raise ValueError(f"need 1 <= min_runs <= max_runs and warmup >= 0, got {min_runs}, {max_runs}, {warmup}")


def measure(models: Mapping[str, ModelSource], feed: Mapping[str, np.ndarray],
            settings: SessionSettings | None = None, *, batch: int = 1, min_runs: int = 20, max_runs: int = 500,
            target_seconds: float = 2.0, warmup: int = 5, deadline: float | None = None,
            aa_control: bool = False, extend_if: ExtendIf | None = None) -> dict[str, LatencyStats]:
    """Time every model on the same `feed`, interleaved, and return each one's stats by name.

    `batch` is how many samples one run of `feed` holds (for throughput). Runs continue until at
    least `min_runs` rounds and `target_seconds` have passed, at most `max_runs` rounds. `deadline`
    (a `time.monotonic()` value) bounds the whole measurement: past it, timing stops after the
    current round (stats say `deadline_hit`); if it has already passed, BudgetExceededError.
    `aa_control` also times the first model as a second session, reported as AA_CONTROL;
    `extend_if` may ask, once, for as much timing again (see ExtendIf).
    """
    _check_counts(min_runs, max_runs, warmup)
    if not models:
        raise ValueError("measure needs at least one model")
    if _past(deadline):
        raise BudgetExceededError("the time budget ran out before latency could be measured")
    opened = _open(models, settings, aa_control)
    return _time_interleaved(opened, feed, batch, min_runs=min_runs, max_runs=max_runs,
                             target_seconds=target_seconds, warmup=warmup, deadline=deadline, extend_if=extend_if)


def has_dynamic_batch(session: ort.InferenceSession) -> bool:
    """True when axis 0 of every input is dynamic (a name or unknown), so any batch size can be fed."""
    inputs = session.get_inputs()
    return bool(inputs) and all(len(i.shape) >= 1 and not isinstance(i.shape[0], int) for i in inputs)


def batch_feed(feed: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The feed with axis 0 cut or repeated to `batch` rows (repeating the rows it has)."""
    out = {}
    for name, array in feed.items():
        if array.ndim == 0 or array.shape[0] == 0:
            raise ValueError(f"input {name!r} has no batch axis to resize (shape {list(array.shape)})")
        reps = -(-batch // array.shape[0])
        out[name] = np.ascontiguousarray(np.concatenate([array] * reps)[:batch])
    return out


def measure_batches(models: Mapping[str, ModelSource], feed: Mapping[str, np.ndarray],
                    settings: SessionSettings | None = None, *, batch_sizes: Sequence[int] = (1, 8),
                    min_runs: int = 20, max_runs: int = 500, target_seconds: float = 2.0, warmup: int = 5,
                    deadline: float | None = None, aa_control: bool = False,
                    extend_if: ExtendIf | None = None,
                    row_by_row: Collection[str] = (), extensions: int = 1) -> dict[int, dict[str, LatencyStats]]:
    """`measure` at each batch size, when every model's batch axis (axis 0 of every input) is dynamic.

    Returns {batch: {model name: stats}}. Sessions are created once and reused; `target_seconds` and
    the run counts apply per batch size. If any model has a fixed axis 0, only `feed` as given is
    timed, reported as batch 1. Batch sizes the deadline leaves no time for are left out.
    `aa_control` and `extend_if` as in `measure` (`extensions`: how many times `extend_if` may extend one batch
    size). The models named in `row_by_row` run a batch as one run per
    row, as the service runs a graph that mixes rows (their stats say `row_by_row`).
    """
    _check_counts(min_runs, max_runs, warmup)
    if not models or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("measure_batches needs at least one model and batch sizes >= 1")
    if _past(deadline):
        raise BudgetExceededError("the time budget ran out before latency could be measured")
    opened = _open(models, settings, aa_control)
    dynamic = all(has_dynamic_batch(o.session) for o in opened.values())
    plan = [(b, batch_feed(feed, b)) for b in batch_sizes] if dynamic else [(1, dict(feed))]
    results: dict[int, dict[str, LatencyStats]] = {}
    for batch, batch_inputs in plan:
        if results and _past(deadline):
            break
        results[batch] = _time_interleaved(opened, batch_inputs, batch, min_runs=min_runs, max_runs=max_runs,
                                           target_seconds=target_seconds, warmup=warmup, deadline=deadline,
                                           extend_if=extend_if, row_by_row=row_by_row, extensions=extensions)
    return results

"""precision=auto on the CPU: search the INT8/FP16 recipes by measuring, cheapest work first, then repair.

No single recipe is safe on real models (pitfalls.md: QOperator U8S8 is fastest and breaks accuracy
on half of them, QDQ S8S8 is slower than FP32 on most), so auto builds and measures instead of
guessing, in steps that each decide what the next one is worth:

1. probe: every recipe that is cheap to build (dynamic S8/U8 per-channel; static MinMax in QDQ and
   QOperator, S8S8 and U8S8, all ops and Conv/MatMul/Gemm only) is built, judged on the held-back
   samples and timed once, interleaved with the FP32 models at the selection batch size; on an x86
   CPU without VNNI the U8S8 recipes get 7-bit weight twins ("-rr") and S8S8 is held back
   (`candidates.auto_plan`), and a twin that differs only in reduce_range runs the same kernels, so
   of two failing twins the repair takes the one closer to passing;
2. repair: two failing INT8 combinations, static or dynamic, the closest to passing of those that
   probed at least MIN_REPAIR_SPEEDUP faster than FP32 (with FIRST_TARGET_SHARE of the time), then the
   fastest (mostly an all-op recipe that fails worst), are re-quantized with nodes left in float:
   first, when a failing output is a Concat of inputs on very different ranges (a detector's boxes
   0-320 next to its Sigmoid scores 0-1, which one INT8 scale rounds to 0), that
   Concat and the small branch's cheap tail (`sensitivity.mixed_range_concats`: one build, no heavy
   node), kept in every later attempt when it does not pass alone; then the output head (cheap,
   costs no speed on real models), then, from a
   ranking by `optimizer.sensitivity`, each of the top units alone in float (leave-one-out, scored
   by its accuracy margin, at most a third of the target's time), a greedy union of the units that
   raised the margin most, and last the cumulative top units of the ranking; each union grows
   1, 2, 4, 8, 16 units until it passes, then bisects down to the fewest that pass (each unit in
   float costs speed). A static target is ranked on its QDQ twin by ONNX
   Runtime's qdq_loss_debug (a unit: a quantized tensor's producer and consumers); a dynamic one,
   which has no Q/DQ pairs, against the float source (a unit: one quantized node, scored by the
   error it adds to what its inputs already carry: `sensitivity.rank_dynamic`). Only nodes the
   target quantizes at all (its op-type scope) are left in float, so no build is spent on a no-op
   exclusion. The margin is read from the metric that gates each output (`accuracy_margin`), so it
   agrees with pass/fail. Each target gets an equal share of the budget left;
3. methods: latency does not depend on the calibration method, so Percentile and then Entropy
   (slow, memory-hungry) calibrate only the combinations that measured faster than fused FP32 and
   faster than the best variant that already passes, and failed accuracy with MinMax, and only
   when the time their histograms are expected to take is left.
Every static build shares one calibration per method (`int8_static.SharedCalibration`): the ranges
depend on the float model, the samples and the method only, so the grid and each repair attempt
cost a quantize_static run, not a calibration (20-35 s on real models before). Entropy and
Percentile cannot share statistics with each other: ORT's collectors build different histograms
(value range vs absolute value). Static and dynamic builds also share one quant_pre_process of the
source (`int8_dynamic.Preprocessed`, handed to the SharedCalibration): 2-4 s each on MiniLM.
Pruning compares speed-ups over FP32 as the median of paired rounds (`latency.paired_ratio`), not
two p50s, which flip between run-through and preempted modes under load.
A passing repair is timed against FP32 side by side at once: float islands add Q/DQ boundaries
and can make it slower than FP32 (pitfalls.md), and then the search goes on instead of stopping.
The probe may use half of the build budget; grid candidates past that are built after the repair
and the methods, if time is left. Everything past the budget's build deadline is skipped and
listed with its reason.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import onnx

from optimizer import sensitivity
from optimizer.accuracy import Tolerance, parse_metric
from optimizer.calibration import SampleSet
from optimizer.candidates import (
    Candidate,
    auto_plan,
    conv_matmul_candidate,
    dynamic_candidate,
    smooth_config,
    static_name,
    static_twin,
)
from optimizer.errors import first_line
from optimizer.latency import BenchmarkError, LatencyStats, measure_batches, paired_ratio
from optimizer.passes import conv_matmul
from optimizer.passes.equalize import EqualizeConfig, Equalized
from optimizer.passes.int8_dynamic import Preprocessed
from optimizer.passes.int8_static import SharedCalibration
from optimizer.passes.smooth import Smoothed
from optimizer.runtime import SessionSettings
from optimizer.variants import Built, build, evaluate

#: Failing INT8 combinations the repair step works on: the closest to passing, then the fastest (`_repair_targets`).
MAX_REPAIR_TARGETS = 2
#: Share of the repair time the closest-to-passing target may use when there are more: it is the likeliest to pass
#: (PP-OCR det, load 12: the fastest target, all-op QOperator at cosine 0.870, spent half the repair time on 4 builds
#: that all stayed at 0.870, while the "-eq" target at 0.9916 ran out of its half after 2 builds, at 0.9918).
FIRST_TARGET_SHARE = 2 / 3
#: Probe speed-up over fused FP32 a failing variant needs to be repaired for being close to passing: a repair gives
#: back part of the gain (float islands), and the final choice needs a speed-up clear of the A/A noise anyway.
MIN_REPAIR_SPEEDUP = 1.1
#: How many of the most sensitive tensors' nodes each repair attempt leaves in float.
REPAIR_STEPS = (1, 2, 4, 8, 16)
#: Sensitive units (a tensor's producer and consumers) each tried alone in float before combining them.
LEAVE_ONE_OUT_UNITS = 8
#: Share of a repair target's time the leave-one-out step may use: the unions need the rest, and on MiniLM
#: (no unit alone moves the margin) a loaded machine spent half on leave-one-out and ran out at top-4 of 8.
LEAVE_ONE_OUT_SHARE = 1 / 3
#: Tensors that lose less than this (mean relative error per channel) are not worth leaving in float.
MIN_TENSOR_ERROR = 0.02
LATER_METHODS = ("percentile", "entropy")
#: Share of the build budget the probe may use before deferring the rest of the grid.
PROBE_SHARE = 0.5
#: Percentile/Entropy histogram calibration vs a MinMax build, at least (measured here: 5-35x on real CNNs).
METHOD_COST_FACTOR = 5.0

Notify = Callable[[str, float], None]


@dataclass
class AutoSearch:
    """One auto search over a fused FP32 `source`; rows land in `built`, shared with the pipeline."""

    source: onnx.ModelProto
    samples: SampleSet
    settings: SessionSettings
    tolerance: Tolerance
    reference: list[dict]
    provider: str
    deadline: float  # monotonic time after which nothing more is built
    built: dict[str, Built]  # holds the baseline and fused rows already
    fp32_name: str  # the FP32 variant every candidate must beat (fused, or the original when fusing failed)
    timing_deadline: float | None = None  # the probe timing may run until then (None: `deadline`)
    batch: int = 1
    probe_seconds: float = 1.0
    prune_by_latency: bool = True  # False: every failing combination is worth work (tests: no timing)
    only: tuple[str, ...] | None = None  # probe only these candidate names
    fp16_on_cpu: bool | None = None
    cpu: frozenset[str] | None = None  # the CPU's flags the grid is planned for (candidates.cpu_flags; None: this one)
    unprovable: str | None = None  # why no variant can pass on these held-back samples: nothing is built
    notify: Notify = field(default=lambda stage, fraction: None)
    steps_s: dict[str, float] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    repairs: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    threads_notes: list[str] = field(default_factory=list)  # what the fewer-threads step decided (optimizer.threads)
    deferred: list[Candidate] = field(default_factory=list)
    # (target, exclusions) -> the attempt's outcome: a union repeating an earlier attempt is not built again
    _tried: dict[tuple[str, tuple[str, ...]], Built | bool] = field(default_factory=dict)
    _target_deadline: float = float("inf")  # the current repair target's share of the budget ends then
    _kept: tuple[str, ...] = ()  # nodes every attempt of the current repair target leaves in float
    # variant -> speed-up over `fp32_name` (median of paired rounds) from the probe or a repair's own timing
    _paired: dict[str, float] = field(default_factory=dict)
    _op_types: dict[int, dict[str, str]] = field(default_factory=dict)  # id(model) -> node name -> op type
    _convs_as_matmul: onnx.ModelProto | None = None  # source with its 1-D Convs as MatMuls ("-c2m" targets rank on it)
    # one quant_pre_process per source for every INT8 build of this search, static and dynamic
    prepared: Preprocessed = field(default_factory=Preprocessed)
    # one calibration per method for every static build of this search (pre-processed by `prepared`)
    shared: SharedCalibration = field(init=False)
    # one smoothing per source for every "-sq" build of this search and its ranking
    smoothed: Smoothed = field(default_factory=Smoothed)
    # one equalization per source for every "-eq" static build of this search
    equalized: Equalized = field(default_factory=Equalized)

    def __post_init__(self) -> None:
        self.shared = SharedCalibration(self.prepared)

    # -- the steps -------------------------------------------------------------------------------

    def run(self) -> None:
        if self.unprovable:
            self.skipped.append({"name": "every INT8 and FP16 candidate", "reason": self.unprovable})
            self.decisions.append("nothing built: the held-back samples cannot prove the accuracy gate")
            return
        for step, fn in (("probe_build", self._probe), ("probe_benchmark", self._time_probe),
                         ("repair", self._repair), ("calibration_methods", self.other_methods),
                         ("deferred_probe", self._deferred)):
            started = time.perf_counter()
            fn()
            self.steps_s[step] = round(time.perf_counter() - started, 3)

    def _probe(self) -> None:
        ops = [n.op_type for n in self.source.graph.node]
        matmul_heavy = sum(op in ("MatMul", "Gemm", "Attention", "LSTM", "GRU") for op in ops) > ops.count("Conv")
        plan = auto_plan(provider=self.provider, method="minmax", has_calibration=not self.samples.synthetic,
                         fp16_on_cpu=self.fp16_on_cpu, matmul_heavy=matmul_heavy,
                         shared=self.shared, prepared=self.prepared, smoothed=self.smoothed,
                         equalized=self.equalized, source=self.source, cpu=self.cpu)
        # a candidate held back for this CPU is built when asked for by name (its skipped row then goes)
        chosen = plan.candidates if self.only is None else [c for c in plan.candidates + plan.held_back
                                                            if c.name in self.only]
        named = {c.name for c in plan.held_back if c in chosen}
        self.skipped += [s for s in plan.skipped if s["name"] not in named]
        self.decisions += plan.notes
        self.skipped += [{"name": c.name, "reason": "not in the requested candidate list"}
                         for c in plan.candidates if c not in chosen]
        # On real models each static build calibrates again (~5-35 s): past its share of the budget the
        # probe stops, so the repair of the fastest candidates still gets time; the rest is built last.
        probe_deadline = time.monotonic() + PROBE_SHARE * max(self.deadline - time.monotonic(), 0.0)
        for i, candidate in enumerate(chosen):
            if i and time.monotonic() >= probe_deadline:
                self.deferred = chosen[i:]
                self.decisions.append(f"probe share of the budget used after {i} candidates: "
                                      f"{[c.name for c in self.deferred]} deferred until after the repair")
                break
            self.notify("calibrate" if candidate.settings.get("mode") == "static" else "quantize",
                        0.2 + 0.3 * i / max(len(chosen), 1))
            self._add(candidate)

    def _deferred(self) -> None:
        """Grid candidates the probe had no time for: built and judged now if time is left (the final
        benchmark times the ones that pass), else listed as skipped."""
        for candidate in self.deferred:
            self._add(candidate)

    def _time_probe(self) -> None:
        """One short interleaved timing of everything that runs: what is worth calibrating or repairing."""
        self.notify("benchmark", 0.5)
        timed = {n: b.model.SerializeToString() for n, b in self.built.items()
                 if b.model is not None and b.row.status in ("ok", "rejected")}
        try:
            by_batch = measure_batches(timed, self.samples.holdout[0], self.settings, batch_sizes=(self.batch,),
                                       min_runs=10, target_seconds=self.probe_seconds,
                                       # the probe timing is what makes pruning possible: it may use the
                                       # time kept for the final benchmark when building ran late
                                       deadline=self.timing_deadline or self.deadline)
        except BenchmarkError as exc:
            self.decisions.append(f"probe timing failed ({first_line(exc)}): no candidate is pruned by latency")
            return
        for stats in by_batch.values():
            self._record_probe(stats)

    def _record_probe(self, stats: dict[str, LatencyStats], only: str | None = None) -> None:
        """Each timed row's probe p50/p90 (`only` that row's), and its speed-up over FP32 as the median of
        paired rounds: what pruning decides by (two p50s under load flip between run-through and preempted
        modes; a burst hits both runs of a round and cancels in its ratio: optimizer/latency.py)."""
        fp32 = stats.get(self.fp32_name)
        for name, s in stats.items():
            if only is not None and name != only:
                continue
            self.built[name].row.probe_latency_ms = {"p50": round(s.p50_ms, 4), "p90": round(s.p90_ms, 4)}
            if fp32 is not None and name != self.fp32_name and s.round_ms and fp32.round_ms:
                self._paired[name] = paired_ratio(fp32, s).median

    def other_methods(self) -> None:
        """Percentile, then Entropy, for the failing static combinations worth it (see the module docstring)."""
        self.notify("calibrate", 0.65)
        static = [b.row for b in self.built.values() if b.row.settings.get("mode") == "static"
                  and b.row.settings.get("method") == "minmax" and "exclude_nodes" not in b.row.settings]
        failed: dict[tuple[str, str], str] = {}  # (scope, method) -> the variant it failed on
        for row in sorted(static, key=self._probe_p50):
            later = [static_twin(row.settings, method=m, shared=self.shared, equalized=self.equalized)
                     for m in LATER_METHODS]
            if row.status in ("failed", "skipped"):
                self._skip(later, f"its MinMax twin {row.name} did not build ({row.status})")
                continue
            if row.status == "ok":
                self._skip(later, f"its MinMax twin {row.name} already passes, and the calibration method does "
                                  "not change latency")
                continue
            repaired = self._passing_repair(row.name)
            if repaired:
                self._skip(later, f"the repaired {repaired} already passes")
                continue
            twin = self._passing_twin(row)
            if twin:
                self._skip(later, f"{twin} runs the same kernels (only reduce_range differs) and already passes")
                continue
            why_not = self.not_worth_work(row)
            if why_not:
                self._skip(later, why_not)
                continue
            # (7-bit weights change what a method's ranges give: a "-rr" twin is a scope of its own)
            scope = (str(row.settings["op_types"]) + ("-eq" if row.settings.get("equalize") else "")
                     + ("-rr" if row.settings.get("reduce_range") else ""))
            for i, candidate in enumerate(later):
                method = candidate.settings["method"]
                if (scope, method) in failed:
                    # The ranges a method computes depend on the scope (which tensors) only, not on the format
                    # or activation type: a faster twin already showed they do not pass.
                    self._skip([candidate], f"{method} ranges for this scope already failed on {failed[scope, method]}")
                    continue
                expected, left = self._method_cost(row, method), self.deadline - time.monotonic()
                if expected > left:
                    self._skip(later[i:], f"calibrating it would take ~{expected:.0f} s (histograms in numpy) and "
                                          f"{max(left, 0):.0f} s of the build budget are left")
                    break
                if self._add(candidate).row.status == "ok":
                    self._skip(later[i + 1:], f"{candidate.name} already passes")
                    break
                failed[scope, method] = candidate.name

    def _repair(self) -> None:
        self.notify("quantize", 0.55)
        rows = [b.row for b in self.built.values()
                if b.row.precision == "int8" and b.row.status == "rejected" and "exclude_nodes" not in b.row.settings]
        rows, slot = self._closer_of_equalized_twins(rows)
        # Of rows that only differ in what does not change latency (a recipe and its "-rr" twin: same kernels),
        # the one closest to passing is repaired: by probe time alone the noise between equal twins chose.
        closest: dict[tuple, Any] = {}
        for row in rows:
            combo = self._combo(row.settings)
            if combo not in closest or (accuracy_margin(row.accuracy, self.tolerance)
                                        > accuracy_margin(closest[combo].accuracy, self.tolerance)):
                closest[combo] = row
        worth, seen = [], set()
        for row in sorted(rows, key=lambda r: slot.get(r.name, self._probe_p50(r))):
            combo = self._combo(row.settings)
            if combo in seen or self._combo_passes(combo):
                continue
            seen.add(combo)
            if closest[combo] is not row:
                self.skipped.append({"name": f"{row.name} (repair)", "reason": (
                    f"{closest[combo].name} runs the same kernels (only reduce_range differs) and is closer to "
                    "passing: it is repaired instead")})
                row = closest[combo]
            why_not = self.not_worth_work(row)
            if why_not:
                self.skipped.append({"name": f"{row.name} (repair)", "reason": why_not})
            else:
                worth.append(row)
        targets = self._repair_targets(worth)
        self.skipped += [{"name": f"{row.name} (repair)", "reason": (
            f"only {MAX_REPAIR_TARGETS} failing variants are repaired: the closest to passing of those at least "
            f"{MIN_REPAIR_SPEEDUP}x faster than {self.fp32_name} in the probe, then the fastest")}
            for row in worth if row not in targets]
        for i, row in enumerate(targets):
            # the closest gets FIRST_TARGET_SHARE, the others equal shares of what is left (and of what an earlier
            # target did not use), so no target starves the next
            left = max(self.deadline - time.monotonic(), 0.0)
            share = left * FIRST_TARGET_SHARE if i == 0 and len(targets) > 1 else left / (len(targets) - i)
            self.repairs.append(self._repair_one(row, time.monotonic() + share))

    def _repair_targets(self, rows: list[Any]) -> list[Any]:
        """Of the failing variants worth work (`rows`, fastest first), the one closest to passing
        (`accuracy_margin`) among those whose probe speed-up is at least MIN_REPAIR_SPEEDUP, then the fastest.

        WHY not the fastest two: those are usually all-op recipes that fail worst (a NaN, a cosine of
        0.87), while a heavy-only or "-eq" recipe close to passing needs few nodes in float and keeps most
        of its gain; fastest-first reached it only by luck."""
        gaining = [r for r in rows if (self._speedup(r) or float("inf")) >= MIN_REPAIR_SPEEDUP]
        # max() keeps the first of equal margins: the fastest of them
        targets = [max(gaining, key=lambda r: accuracy_margin(r.accuracy, self.tolerance))] if gaining else []
        targets += [r for r in rows if r not in targets][:MAX_REPAIR_TARGETS - len(targets)]
        return targets

    def _closer_of_equalized_twins(self, rows: list[Any]) -> tuple[list[Any], dict[str, float]]:
        """Of a static recipe and its "-eq" twin (same recipe, Conv channels equalized first), only the one
        closer to passing is a repair target, and it takes the plain recipe's place in the fastest-first
        order (returned: row name -> probe p50 to sort by). By its own probe time the twin (its Divs) was
        never among the fastest, yet on PP-OCR det its cosine is 0.992 where the plain recipe's is 0.919."""
        by_name = {row.name: row for row in rows}
        dropped, slot = set(), {}
        for row in rows:
            if not row.settings.get("equalize"):
                continue
            op_types = None if row.settings["op_types"] == "all" else tuple(row.settings["op_types"])
            plain = by_name.get(static_name(row.settings["method"], row.settings["format"],
                                            row.settings["activation_type"], op_types))
            if plain is None:
                continue
            margins = {r.name: accuracy_margin(r.accuracy, self.tolerance) for r in (row, plain)}
            worse, better = (plain, row) if margins[row.name] > margins[plain.name] else (row, plain)
            dropped.add(worse.name)
            slot[better.name] = self._probe_p50(plain)
            self.skipped.append({"name": f"{worse.name} (repair)", "reason": (
                f"its twin {better.name} is closer to passing (accuracy margin {margins[better.name]:.4f} vs "
                f"{margins[worse.name]:.4f}) and is repaired instead")})
        return [row for row in rows if row.name not in dropped], slot

    # -- repair of one variant -------------------------------------------------------------------

    def _repair_one(self, row: Any, deadline: float) -> dict[str, Any]:
        """A mixed-range output Concat first, then the head; then leave-one-out over the most sensitive
        units, a greedy union of the ones that helped, and the cumulative top-k units of the ranking, until
        a variant passes and is not slower than FP32 (every passing repair is timed), or `deadline`.
        Leave-one-out may use a third of the time left, so that the unions, which are what passed on real
        models so far, still get built."""
        record: dict[str, Any] = {"target": row.name, "attempts": [], "ranking": None, "passed": None}
        self._target_deadline = deadline
        self._kept = ()
        base = accuracy_margin(row.accuracy, self.tolerance)
        concat = self._mixed_range_unit(row, record)
        outcome = self._attempt(row, concat, "repair-concat", "output Concat of mixed ranges (and its small branch's "
                                "tail) in float", record)
        if outcome in (True, None):
            return record
        if isinstance(outcome, Built) and outcome.row.accuracy:
            # It fixed the shared scale but something else still fails: every later attempt keeps it, or the
            # zeroed scores hide what each of them does (NudeNet: every leave-one-out kept slice cosine 0.000).
            # Kept whatever its margin: NudeNet's worst slice error rose (zeroed scores err by 100% of a slice's
            # range, restored ones with noisy logits by up to 300%) while its slice cosine went 0.000 -> 0.591.
            self._kept, base = concat, accuracy_margin(outcome.row.accuracy, self.tolerance)
            record["kept_in_float"] = list(concat)
        head = self._in_scope(row, sensitivity.head_nodes(self.source))
        record["head_nodes"] = list(head)
        if self._attempt(row, head, "repair-head", "output head in float", record) in (True, None):
            return record
        ranking = self._ranking(row, record)
        if not ranking:
            return record
        worth = [t for t in ranking if t.error >= MIN_TENSOR_ERROR] or ranking[:1]
        units: list[tuple[str, ...]] = []
        for loss in worth:
            unit = self._in_scope(row, loss.nodes)
            if unit and unit not in units:
                units.append(unit)
        # 1. leave-one-out: each of the most sensitive units alone, scored by its accuracy margin
        loo_deadline = time.monotonic() + LEAVE_ONE_OUT_SHARE * max(deadline - time.monotonic(), 0.0)
        gains: list[tuple[float, tuple[str, ...]]] = []
        for i, unit in enumerate(units[:LEAVE_ONE_OUT_UNITS]):
            if time.monotonic() >= loo_deadline:
                record["note"] = f"leave-one-out stopped after {i} units: its share of this repair's time was used"
                break
            built = self._attempt(row, unit, f"repair-loo{i + 1}", f"the nodes of sensitive tensor #{i + 1} alone "
                                  "in float (leave-one-out)", record)
            if built is True or built is None:
                return record
            if isinstance(built, Built):
                gains.append((accuracy_margin(built.row.accuracy, self.tolerance) - base, unit))
        # 2. greedy: the units that helped most, combined in order of their gain
        helpful = [unit for gain, unit in sorted(gains, key=lambda g: -g[0]) if gain > 0]
        outcome = self._smallest_union(row, helpful, "greedy", "units whose leave-one-out helped most, together",
                                       record)
        if outcome is not False:
            return record
        # 3. the cumulative top-k of the ranking (errors spread over many tensors)
        self._smallest_union(row, units, "top", "most sensitive units", record)
        return record

    def _smallest_union(self, row: Any, units: list[tuple[str, ...]], label: str, what: str,
                        record: dict[str, Any]) -> bool | None:
        """Leave the first 1, 2, 4, 8, 16 ... `units` in float until the union passes, then bisect down to the
        fewest that pass: every unit more in float costs speed (MiniLM: 3 of 25 quantized nodes left in
        float 1.71x FP32, 10 1.40x, 16 1.00x), so the first passing size is seldom the fastest.

        True when a passing variant also measured faster than FP32 (`record["passed"]` names the smallest),
        None when the time ran out first, False when no union passed faster than FP32."""
        sizes = [n for n in REPAIR_STEPS if n < len(units)] + [len(units)] if units else []
        faster: bool | None = False
        failing, passing = 0, None
        for n in sizes:
            outcome = self._union(row, units, n, label, what, record)
            if outcome is None:
                return None
            if self._passes(outcome):
                faster, passing = outcome is True, n
                break
            failing = n
        while passing is not None and passing - failing > 1:
            middle = (failing + passing) // 2
            outcome = self._union(row, units, middle, label, what, record)
            if outcome is None:
                return True if faster else None
            if self._passes(outcome):
                passing, faster = middle, faster or outcome is True
            else:
                failing = middle
        return faster

    def _union(self, row: Any, units: list[tuple[str, ...]], n: int, label: str, what: str,
               record: dict[str, Any]) -> Built | bool | None:
        nodes: list[str] = []
        for unit in units[:n]:
            nodes += [name for name in unit if name not in nodes]
        return self._attempt(row, tuple(nodes), f"repair-{label}{n}", f"the {n} {what} in float", record)

    @staticmethod
    def _passes(outcome: Built | bool | None) -> bool:
        """An attempt's outcome passes accuracy (True: and beats FP32; a Built "ok": passes but is slower)."""
        return outcome is True or (isinstance(outcome, Built) and outcome.row.status == "ok")

    def _mixed_range_unit(self, row: Any, record: dict[str, Any]) -> tuple[str, ...]:
        """The nodes that give each branch of a failing output's Concat its own scale (`sensitivity.
        mixed_range_concats`), in the target's scope: one float run per feed, then a single build."""
        failing = [name for name, out in (row.accuracy or {}).get("outputs", {}).items() if out.get("passed") is False]
        if not failing:
            return ()
        try:
            found = sensitivity.mixed_range_concats(self.source, self.samples.calibration or self.samples.holdout,
                                                    failing)
        except Exception as exc:  # noqa: BLE001 - a model ORT cannot run with extra outputs is not a repair
            record["note"] = f"the Concat ranges could not be read: {first_line(exc)}"
            return ()
        record["mixed_concats"] = [c.to_dict() for c in found]
        return self._in_scope(row, [n for c in found for n in c.nodes])

    def _ranking(self, row: Any, record: dict[str, Any]) -> list[sensitivity.TensorLoss]:
        """Static: rank tensors on the QDQ model with the target's activation type and scope (built in the
        probe). Dynamic: rank the target's quantized nodes against the float source."""
        feeds = self.samples.calibration or self.samples.holdout
        if row.settings.get("mode") == "static":
            op_types = None if row.settings["op_types"] == "all" else tuple(row.settings["op_types"])
            twin_name = static_name("minmax", "qdq", row.settings["activation_type"], op_types,
                                    equalized=bool(row.settings.get("equalize")),
                                    reduce_range=bool(row.settings.get("reduce_range")))
            twin = self._qdq_twin(twin_name)
            if twin is None or twin.model is None:
                record["note"] = f"no QDQ twin ({twin_name}) to rank sensitive nodes on"
                return []
            rank = partial(sensitivity.rank, twin.model, feeds)
        else:
            target = self.built.get(row.name)
            if target is None or target.model is None:
                record["note"] = "the dynamic target's model is gone: nothing to rank against the float source"
                return []
            # a "-sq" target quantized the smoothed source: rank against that
            rank = partial(sensitivity.rank_dynamic, self._quantized_source(row), target.model, feeds)
        if time.monotonic() >= min(self.deadline, self._target_deadline):
            record["note"] = "the time budget for this repair ran out before the sensitivity ranking"
            return []
        started = time.perf_counter()
        try:
            ranking = rank()
        except Exception as exc:  # noqa: BLE001 - ORT's debug tools raise anything
            record["note"] = f"sensitivity ranking failed: {first_line(exc)}"
            return []
        record["ranking_s"] = round(time.perf_counter() - started, 3)
        record["ranking"] = [t.to_dict() for t in ranking[:10]]
        return ranking

    def _qdq_twin(self, name: str) -> Built | None:
        """The QDQ twin a static target is ranked on, built now when the probe deferred it: one quantize_static
        run, the calibration is shared. Without it a QOperator target got no ranking (PicoDet layout at load
        16: the probe built 1 recipe in its share, and that target's repair stopped after the head)."""
        if name in self.built:
            return self.built[name]
        deferred = next((c for c in self.deferred if c.name == name), None)
        if deferred is None or time.monotonic() >= min(self.deadline, self._target_deadline):
            return None
        self.deferred.remove(deferred)
        return self._add(deferred)

    def _attempt(self, row: Any, exclude: tuple[str, ...], suffix: str, what: str,
                 record: dict[str, Any]) -> Built | bool | None:
        """One repair build: True when it passes (and, where timed, beats FP32); its Built when it does not;
        False when there is nothing to leave in float; None when the time budget ran out. Nodes an earlier
        attempt already left in float give its outcome again, without a build. The target's kept unit (a
        mixed-range Concat) is left in float with `exclude`."""
        if not exclude:
            return False
        exclude = tuple(dict.fromkeys((*self._kept, *exclude)))
        key = (row.name, tuple(sorted(exclude)))
        if key in self._tried:
            return self._tried[key]
        if row.settings.get("mode") == "static":
            candidate = static_twin(row.settings, exclude=exclude, suffix=suffix, shared=self.shared,
                                    equalized=self.equalized)
        elif row.settings.get("conv_as_matmul"):
            candidate = conv_matmul_candidate(exclude=exclude, suffix=suffix, prepared=self.prepared,
                                              reduce_range=bool(row.settings.get("reduce_range")))
        else:
            candidate = dynamic_candidate(row.settings["weight_type"], row.settings["per_channel"], exclude=exclude,
                                          suffix=suffix, prepared=self.prepared,
                                          smooth_alpha=(row.settings.get("smooth") or {}).get("alpha"),
                                          smoothed=self.smoothed, reduce_range=bool(row.settings.get("reduce_range")))
        candidate.settings.update({"repair_of": row.name, "repair": what})
        if time.monotonic() >= min(self.deadline, self._target_deadline):
            self.skipped.append({"name": candidate.name, "reason": "the time budget for this repair ran out"})
            return None
        built = self._add(candidate)
        attempt = {"name": candidate.name, "excluded_nodes": list(exclude), "status": built.row.status,
                   "reason": built.row.reason, "build_s": built.row.build_s,
                   "margin": round(accuracy_margin(built.row.accuracy, self.tolerance), 5)}
        record["attempts"].append(attempt)
        self._tried[key] = built
        if built.row.status != "ok":
            return built
        slower = self._slower_than_fp32(built)
        if slower:
            attempt["note"] = slower
            record.setdefault("passed_but_slower", []).append(candidate.name)
            return built
        record["passed"] = candidate.name
        self._tried[key] = True
        return True

    def _slower_than_fp32(self, built: Built) -> str | None:
        """Time a passing repair against FP32 (float islands add Q/DQ boundaries and can make it slower);
        a reason when it is not faster, else None. Not timed when pruning by latency is off."""
        if not self.prune_by_latency or built.model is None:
            return None
        fp32 = self.built[self.fp32_name]
        if fp32.model is None:
            return None
        try:
            stats = measure_batches({self.fp32_name: fp32.model.SerializeToString(),
                                     built.row.name: built.model.SerializeToString()},
                                    self.samples.holdout[0], self.settings, batch_sizes=(self.batch,), min_runs=10,
                                    target_seconds=self.probe_seconds, deadline=self.timing_deadline or self.deadline)
        except BenchmarkError as exc:
            self.decisions.append(f"timing the repaired {built.row.name} failed ({first_line(exc)})")
            return None
        timed = next(iter(stats.values()))
        # this row only: FP32's probe p50 stays the one every probed row was timed with
        self._record_probe({name: timed[name] for name in (self.fp32_name, built.row.name)}, only=built.row.name)
        speedup = self._paired.get(built.row.name)
        mine, theirs = timed[built.row.name].p50_ms, timed[self.fp32_name].p50_ms
        if speedup is None:  # no rounds to pair (an empty timing): the p50s are all there is
            speedup = theirs / mine if mine > 0 else 0.0
        if speedup <= 1.0:
            return (f"passes but measured {speedup:.2f}x {self.fp32_name} side by side (median of paired rounds; "
                    f"p50 {mine:.3f} vs {theirs:.3f} ms): its float islands cost more than INT8 saves")
        return None

    # -- helpers ---------------------------------------------------------------------------------

    def _in_scope(self, row: Any, nodes: list[str]) -> tuple[str, ...]:
        """The nodes the target quantizes at all: leaving any other node "in float" changes nothing, and a
        build spent on it would repeat one already made (MiniLM's heavy-scope units paired each MatMul
        with a SkipLayerNormalization the quantizer never touched)."""
        if row.settings.get("mode") == "static":
            scope = None if row.settings["op_types"] == "all" else set(row.settings["op_types"])
        else:
            scope = sensitivity.DYNAMIC_OPS
        if scope is None:
            return tuple(nodes)
        op_of = self._op_types_of(self._quantized_source(row))
        return tuple(n for n in nodes if n not in op_of or op_of[n] in scope)

    def _op_types_of(self, model: onnx.ModelProto) -> dict[str, str]:
        """Node name -> op type in `model`, built once per model: `_in_scope` runs once per ranked unit."""
        if id(model) not in self._op_types:
            self._op_types[id(model)] = {n.name: n.op_type for n in model.graph.node}
        return self._op_types[id(model)]

    def _quantized_source(self, row: Any) -> onnx.ModelProto:
        """The model `row` quantized: `source`, or the search's equalized or smoothed copy of it (cached, so
        the same object every time). Its node names are the ones a ranking of the target names: an "-eq"
        model's inserted `*_eqo_div` Divs are not in `source`, and were taken for quantized nodes."""
        if row.settings.get("equalize"):
            return self.equalized.get(self.source, EqualizeConfig(**row.settings["equalize"]),
                                      self.samples.calibration, self.samples.holdout[0]).model
        if row.settings.get("smooth"):
            return self.smoothed.get(self.source, smooth_config(row.settings["smooth"]["alpha"]),
                                     self.samples.calibration, self.samples.holdout[0]).model
        if row.settings.get("conv_as_matmul"):
            if self._convs_as_matmul is None:
                self._convs_as_matmul = conv_matmul.rewrite(self.source)[0]
            return self._convs_as_matmul
        return self.source

    def _add(self, candidate: Candidate) -> Built:
        built = build(candidate, self.source, self.samples, self.deadline)
        if built.model is not None:
            evaluate(built.model, self.reference, self.samples, self.settings, self.tolerance, built.row)
        self.built[candidate.name] = built
        return built

    def _method_cost(self, row: Any, method: str) -> float:
        """Expected seconds for a build of `row`'s combination with `method`.

        Once the search's shared calibration holds the method's ranges, a build costs what the MinMax
        build of the row did. Before, it is the slowest histogram calibration so far, and at least 5x
        the MinMax calibration (or build) time.
        """
        build_s = row.build_s or 0.0
        if self.shared.calibrated(method):
            return build_s
        minmax = max([c["seconds"] for c in self.shared.calibrations if c["method"] == "minmax"], default=build_s)
        done = [c["seconds"] for c in self.shared.calibrations if c["method"] in LATER_METHODS]
        done += [b.row.build_s for b in self.built.values()
                 if b.row.settings.get("method") in LATER_METHODS and b.row.build_s]
        return max([*done, METHOD_COST_FACTOR * minmax]) + build_s

    def _passing_repair(self, name: str) -> str | None:
        return next((b.row.name for b in self.built.values()
                     if b.row.settings.get("repair_of") == name and b.row.status == "ok"), None)

    def _skip(self, candidates: list[Candidate], reason: str) -> None:
        self.skipped += [{"name": c.name, "reason": reason} for c in candidates]

    def _probe_p50(self, row: Any) -> float:
        """The row's probe p50; a repaired variant (built after the probe) counts at its target's, for
        pruning only: the final benchmark times it for real before it can be served."""
        if row.probe_latency_ms:
            return row.probe_latency_ms["p50"]
        target = self.built.get(row.settings.get("repair_of", ""))
        return target.row.probe_latency_ms["p50"] if target and target.row.probe_latency_ms else float("inf")

    @staticmethod
    def _combo(settings: dict[str, Any]) -> tuple:
        """What decides latency: everything but the calibration method and reduce_range (7-bit weights run the
        same kernels)."""
        if settings.get("mode") == "static":
            return ("static", settings["format"], settings["activation_type"], str(settings["op_types"]),
                    str(settings.get("equalize")))
        return ("dynamic", settings.get("weight_type"), settings.get("per_channel"), str(settings.get("smooth")),
                bool(settings.get("conv_as_matmul")))

    def _combo_passes(self, combo: tuple) -> bool:
        return any(b.row.status == "ok" and b.row.precision == "int8" and self._combo(b.row.settings) == combo
                   for b in self.built.values())

    def _passing_twin(self, row: Any) -> str | None:
        """A passing single recipe that differs from `row` only in reduce_range (the same kernels and speed)."""
        def recipe(settings: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in settings.items() if k != "reduce_range"}
        return next((b.row.name for b in self.built.values() if b.row.status == "ok" and b.row is not row
                     and "exclude_nodes" not in b.row.settings and recipe(b.row.settings) == recipe(row.settings)),
                    None)

    def not_worth_work(self, row: Any) -> str | None:
        """Why more work on this failing variant cannot pay, by the probe timing; None if it may."""
        if not self.prune_by_latency:
            return None
        speedup = self._speedup(row)
        if speedup is None:
            return None  # no timing to prune by
        p50, fp32 = self._probe_p50(row), self.built[self.fp32_name].row.probe_latency_ms or {"p50": float("nan")}
        if speedup <= 1.0:
            return (f"{row.name} measured {p50:.3f} ms vs {self.fp32_name} {fp32['p50']:.3f} ms in the probe "
                    f"({speedup:.2f}x by paired rounds): neither another calibration method nor float islands make "
                    "it faster")
        passing = [b.row for b in self.built.values()
                   if b.row.status == "ok" and b.row.precision != "fp32" and self._speedup(b.row) is not None]
        best = max(passing, key=self._speedup, default=None)
        if best is not None and self._speedup(best) >= speedup:
            return (f"{best.name} already passes and measured faster ({self._probe_p50(best):.3f} ms vs {p50:.3f} ms; "
                    f"{self._speedup(best):.2f}x vs {speedup:.2f}x {self.fp32_name} by paired rounds)")
        return None

    def _speedup(self, row: Any) -> float | None:
        """The row's probe speed-up over FP32: the median of paired rounds where its timing had them, else the
        p50 ratio; a repaired variant not timed yet counts at its target's. None without a timing."""
        if row.name in self._paired:
            return self._paired[row.name]
        if not row.probe_latency_ms:
            target = self.built.get(row.settings.get("repair_of", ""))
            return self._speedup(target.row) if target is not None and target.row is not row else None
        fp32 = self.built[self.fp32_name].row.probe_latency_ms
        if fp32 is None or row.probe_latency_ms["p50"] <= 0:
            return None
        return fp32["p50"] / row.probe_latency_ms["p50"]

    # -- report ----------------------------------------------------------------------------------

    def report(self, selected: str, reason: str) -> dict[str, Any]:
        chosen = self.built[selected].row
        return {
            "rule": ("the fastest variant (highest round-by-round speed-up over the original) at batch "
                     f"{self.batch} that passes the accuracy guard on held-back samples and whose speed-up clears "
                     "this run's A/A noise (report['noise']); when none does, the original model is served"),
            "selected": selected,
            "selection_reason": reason,
            "excluded_nodes": chosen.settings.get("exclude_nodes", []),
            "fp32_reference": self.fp32_name,
            "candidates": [table_row(b.row) for b in self.built.values()],
            "repairs": self.repairs,
            "skipped": self.skipped,
            "decisions": self.decisions,
            "fewer_threads": self.threads_notes,
            "steps_s": self.steps_s,
        }


def accuracy_margin(accuracy: dict[str, Any] | None, tolerance: Tolerance) -> float:
    """How far the worst gating metric sits above its limit (negative: fails): what a repair improves.

    The pass/fail verdict alone cannot say which of two failing repairs came closer; the smallest
    margin over the metrics that gate the checked outputs can. They are exactly the ones
    `accuracy.compare` judges: an output's declared metric alone (top-1 or mask agreement), else
    cosine, top-1 and the worst slice's cosine and error; the max-abs limit for any output. So the
    margin is >= 0 exactly when the variant passes. Cosines, agreements and the slice error are
    fractions already and compare raw (scaling each by its limit's headroom let the whole-tensor
    cosine's 0.01 drown a broken slice's recovery); max-abs is relative to its limit. NaN/Inf, or an
    output that failed without a metric (missing, wrong shape): -inf.
    """
    if not accuracy:
        return float("-inf")
    margins = []
    for name, out in accuracy.get("outputs", {}).items():
        if not out.get("checked", True):
            continue
        if out.get("nonfinite"):
            return float("-inf")
        slices = out.get("slices") or {}
        higher = []  # (value, limit): passes when value >= limit
        lower = []  # (value, limit): passes when value <= limit
        kind, _ = parse_metric(out.get("metric") or "default", name)
        # top-1 gates on its 95% lower bound (accuracy._unproven), so the margin reads the bound where there is one
        top1 = out.get("top1_lower_95") if out.get("top1_lower_95") is not None else out.get("top1")
        if kind == "top1":
            higher.append((top1, tolerance.min_top1))
        elif kind == "mask":
            higher.append((out.get("mask_iou"), tolerance.min_top1))
        else:
            higher += [(out.get("cosine"), tolerance.min_cosine), (top1, tolerance.min_top1),
                       (slices.get("worst_cosine"), tolerance.min_slice_cosine)]
            lower.append((slices.get("worst_error"), tolerance.max_slice_error))
        mine = [value - limit for value, limit in higher if value is not None and limit is not None]
        mine += [limit - value for value, limit in lower if value is not None and limit is not None]
        if tolerance.max_abs is not None and out.get("max_abs") is not None:
            mine.append((tolerance.max_abs - out["max_abs"]) / max(tolerance.max_abs, 1e-12))
        margin = min(mine, default=0.0)
        margins.append(float("-inf") if out.get("passed") is False and margin >= 0 else margin)
    return min(margins, default=0.0)


def _accuracy_summary(accuracy: dict[str, Any] | None) -> dict[str, Any] | None:
    if not accuracy:
        return None
    outputs = {}
    for name, out in accuracy.get("outputs", {}).items():
        slices = out.get("slices") or {}
        outputs[name] = {"passed": out.get("passed"), "metric": out.get("metric", "default"),
                         "cosine": out.get("cosine"), "top1": out.get("top1"),
                         "mask_agreement": out.get("mask_agreement"), "mask_iou": out.get("mask_iou"),
                         "worst_slice_cosine": slices.get("worst_cosine"),
                         "worst_slice_error": slices.get("worst_error")}
    return {"passed": accuracy.get("passed"), "outputs": outputs}


def table_row(row: Any) -> dict[str, Any]:
    """One line of the auto table: final timing when the variant was in the final benchmark, else the probe's."""
    final = row.latency_ms
    latency = {"p50": final["p50"], "p90": final["p90"], "timing": "final"} if final else (
        {**row.probe_latency_ms, "timing": "probe"} if row.probe_latency_ms else None)
    return {"name": row.name, "precision": row.precision, "settings": row.settings,
            "accuracy": _accuracy_summary(row.accuracy), "latency_ms": latency, "size_bytes": row.size_bytes,
            "status": row.status, "reason": row.reason, "build_s": row.build_s,
            # nodes ONNX Runtime's quantizer failed on, left in float so the rest could be quantized
            "tool_excluded_nodes": (row.changes or {}).get("tool_excluded_nodes", [])}


def worst_accuracy(accuracy: dict[str, Any] | None) -> str:
    """The worst cosine, top-1 and slice cosine over the outputs, as one short string."""
    if not accuracy:
        return "-"
    outs = accuracy["outputs"].values()
    parts = []
    for key, label, spec in (("cosine", "cos", ".4f"), ("top1", "top1", ".1%"), ("worst_slice_cosine", "slice", ".3f")):
        values = [o[key] for o in outs if o.get(key) is not None]
        if values:
            parts.append(f"{label} {format(min(values), spec)}")
    return " ".join(parts) or "-"


def format_table(report: dict[str, Any]) -> str:
    """report["auto"] as text: one line per candidate (p50, ratio to the original, accuracy, status), the winner,
    then what the search did (`search_notes`)."""
    auto = report["auto"]
    rows = auto["candidates"]
    base = next((r["latency_ms"]["p50"] for r in rows if r["name"] == "original" and r.get("latency_ms")), None)
    header = f"{'candidate':52} {'status':9} {'p50 ms':>9} {'p90 ms':>9} {'timing':>6} {'vs orig':>8}  accuracy"
    lines = [header, "-" * len(header)]
    for r in rows:
        lat = r.get("latency_ms") or {}
        ratio = f"{base / lat['p50']:.2f}x" if base and lat.get("p50") else "-"
        mark = "*" if r["name"] == auto["selected"] else " "
        p50 = f"{lat['p50']:9.3f}" if lat else f"{'-':>9}"
        p90 = f"{lat['p90']:9.3f}" if lat else f"{'-':>9}"
        lines.append(f"{mark}{r['name']:51} {r['status']:9} {p50} {p90} {lat.get('timing', '-'):>6} {ratio:>8}  "
                     f"{worst_accuracy(r.get('accuracy'))}")
        if r["status"] in ("failed", "skipped") and r.get("reason"):
            lines.append(textwrap.fill(r["reason"], width=120, initial_indent=" " * 10, subsequent_indent=" " * 10))
    lines.append(f"selected: {auto['selected']} ({auto['selection_reason']})")
    return "\n".join(lines + search_notes(auto))


def search_notes(auto: dict[str, Any]) -> list[str]:
    """What the search did beyond the per-candidate numbers: nodes the quantizer failed on, repairs, candidates
    not tried, nodes left in float, the rule and the time per step. Apart from the table so that the CLI can
    print them under the report's variant table without repeating every row."""
    lines = [f"{r['name']}: quantizer failed on {', '.join(r['tool_excluded_nodes'])}: left in float"
             for r in auto["candidates"] if r.get("tool_excluded_nodes")]
    for repair in auto["repairs"]:
        tried = "; ".join(f"{a['name']} ({len(a['excluded_nodes'])} in float): {a['status']}"
                          for a in repair["attempts"])
        lines.append(f"repair of {repair['target']}: {tried or 'nothing tried'}"
                     + (f" [{repair['note']}]" if repair.get("note") else ""))
    for skipped in auto["skipped"]:
        # wrapped, not cut: a reason cut mid-word hid what to do about it (a user review)
        lines.append(textwrap.fill(f"not tried: {skipped['name']}: {skipped['reason']}", width=120,
                                   subsequent_indent="    "))
    lines += [textwrap.fill(f"threads: {note}", width=120, subsequent_indent="    ")
              for note in auto.get("fewer_threads", [])]  # reports written before the step have none
    if auto["excluded_nodes"]:
        lines.append(f"left in float: {', '.join(auto['excluded_nodes'])}")
    lines.append(f"rule: {auto['rule']}")
    lines.append("steps (s): " + ", ".join(f"{k} {v}" for k, v in auto["steps_s"].items()))
    return lines

"""Optimize one model end to end: validate, build each variant in isolation, evaluate, choose, report.

Every variant is built on its own: a tool that raises or writes a model that does not run becomes
a failed variant with its reason, never a crashed job. Every variant that builds is checked for
accuracy on held-back samples and timed side by side with the original on the provider that serves.
The selected variant is never slower or less accurate than the baseline (the original model in a
default ONNX Runtime session, which already fuses at load): when nothing beats it, the original is
served and the report says so.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from optimizer import candidates as candidate_lists
from optimizer.accuracy import Tolerance, compare, run_outputs
from optimizer.calibration import SampleSet, load_samples, synthetic_samples
from optimizer.candidates import Candidate
from optimizer.errors import CalibrationError, OptimizerError
from optimizer.graph_inspect import inspect
from optimizer.latency import LatencyStats, measure_batches
from optimizer.loading import LoadedModel, load_model
from optimizer.passes import cleanup
from optimizer.runtime import SessionSettings, create_session, resolve_provider

#: Called with (stage, progress 0..1). Stages: validate, fuse, calibrate, quantize, evaluate, benchmark.
ProgressCallback = Callable[[str, float], None]

PRECISIONS = ("auto", "fp32", "fp16", "int8")
INT8_MODES = ("static", "dynamic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")

BASELINE = "original"
FUSED = "fused"
#: A variant must beat the baseline's p50 by this much to be served: A/A runs here differ by up to ~2%.
MIN_GAIN = 0.03
#: Share of the time budget that building variants may use; the rest is kept for the benchmark.
BUILD_SHARE = 0.7


@dataclass
class OptimizeConfig:
    """What the user asked for. Defaults are what a user who says nothing should get."""

    precision: str = "auto"
    int8_mode: str | None = None  # None: static when a calibration set is given, else dynamic
    calibration_method: str = "minmax"
    provider: str = "auto"  # auto | cpu | cuda; resolved to what really serves
    threads: int = 0  # intra-op threads for benchmark sessions; 0 = ONNX Runtime's default (as serving)
    holdout_fraction: float = 0.2
    min_cosine: float = 0.99
    min_top1: float = 0.99
    outputs: list[str] | None = None  # the outputs whose accuracy matters (None: all)
    time_budget_s: float = 300.0
    benchmark_seconds: float = 2.0  # timing per batch size, all variants interleaved
    batch_sizes: tuple[int, ...] = (1, 8)

    def validate(self) -> None:
        """Refuse settings that cannot work, with the allowed values in the message."""
        checks = [("precision", self.precision, PRECISIONS), ("calibration_method", self.calibration_method,
                                                                 CALIBRATION_METHODS)]
        if self.int8_mode is not None:
            checks.append(("int8_mode", self.int8_mode, INT8_MODES))
        for name, value, allowed in checks:
            if value not in allowed:
                raise OptimizerError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.time_budget_s <= 0:
            raise OptimizerError(f"time_budget_s must be positive, got {self.time_budget_s}")

    def tolerance(self) -> Tolerance:
        return Tolerance(min_cosine=self.min_cosine, min_top1=self.min_top1, outputs=self.outputs)


@dataclass
class VariantReport:
    """One row of the report: a variant, what happened to it and what it measured."""

    name: str
    precision: str
    settings: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"  # ok | failed | rejected | skipped
    reason: str | None = None
    size_bytes: int | None = None
    node_count: int | None = None
    build_s: float | None = None
    latency_ms: dict[str, float] | None = None  # at the selection batch size
    throughput_per_s: float | None = None
    latency_by_batch: dict[str, dict[str, Any]] = field(default_factory=dict)
    accuracy: dict[str, Any] | None = None
    changes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class OptimizationResult:
    report: dict[str, Any]
    model_path: Path  # the selected variant, written to out_dir/model.onnx
    selected: str


@dataclass
class _Built:
    row: VariantReport
    model: onnx.ModelProto | None = None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _samples(loaded: LoadedModel, calibration: str | Path | bytes | None, config: OptimizeConfig) -> SampleSet:
    if calibration is not None:
        return load_samples(calibration, loaded.proto, holdout_fraction=config.holdout_fraction)
    return synthetic_samples(loaded.proto)


def _int8_mode(config: OptimizeConfig, samples: SampleSet) -> str:
    mode = config.int8_mode or ("dynamic" if samples.synthetic else "static")
    if mode == "static" and samples.synthetic:
        raise CalibrationError(
            "static INT8 needs a calibration set (.npz with one array per model input) and none was given: "
            "upload one, or ask for int8_mode=dynamic (weights only, no samples needed)"
        )
    return mode


def _describe(model: onnx.ModelProto, row: VariantReport) -> None:
    row.size_bytes = model.ByteSize()
    row.node_count = len(model.graph.node)


def _evaluate(model: onnx.ModelProto, reference: list[dict], samples: SampleSet, settings: SessionSettings,
              tolerance: Tolerance, row: VariantReport) -> None:
    """Judge accuracy on the held-back samples; a variant that cannot run there fails."""
    try:
        session = create_session(model.SerializeToString(), settings)
        outputs = run_outputs(session, samples.holdout)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types
        row.status, row.reason = "failed", f"does not run on the held-back samples: {_first_line(exc)}"
        return
    report = compare(reference, outputs, tolerance)
    row.accuracy = report.to_dict()
    if not report.passed:
        row.status, row.reason = "rejected", f"accuracy below tolerance: {report.reason}"


def _build(candidate: Candidate, source: onnx.ModelProto, samples: SampleSet, deadline: float) -> _Built:
    row = VariantReport(name=candidate.name, precision=candidate.precision, settings=candidate.settings)
    if time.monotonic() >= deadline:
        row.status, row.reason = "skipped", "the job's time budget ran out before this variant was built"
        return _Built(row)
    started = time.perf_counter()
    try:
        result = candidate.build(source, samples)
    except OptimizerError as exc:
        row.status, row.reason = "failed", str(exc)
        return _Built(row)
    except Exception as exc:  # noqa: BLE001 - a tool's bug must not end the job
        row.status, row.reason = "failed", f"{type(exc).__name__} in ONNX Runtime's tools: {_first_line(exc)}"
        return _Built(row)
    finally:
        row.build_s = round(time.perf_counter() - started, 3)
    row.changes, row.notes = result.changes, result.notes
    _describe(result.model, row)
    return _Built(row, result.model)


def _benchmark(built: dict[str, _Built], samples: SampleSet, settings: SessionSettings, config: OptimizeConfig,
               deadline: float) -> None:
    """Time every variant that runs correctly, interleaved with the baseline, at each batch size."""
    timed = {name: b.model.SerializeToString() for name, b in built.items()
             if b.model is not None and b.row.status in ("ok", "rejected")}
    remaining = max(deadline - time.monotonic(), 1.0)
    target = min(config.benchmark_seconds, remaining / (2 * len(config.batch_sizes)))
    by_batch = measure_batches(timed, samples.holdout[0], settings, batch_sizes=config.batch_sizes,
                               target_seconds=target, deadline=deadline + 60)
    selection_batch = min(by_batch)
    for batch, stats in by_batch.items():
        for name, s in stats.items():
            built[name].row.latency_by_batch[str(batch)] = s.to_dict()
            if batch == selection_batch:
                _set_latency(built[name].row, s)


def _set_latency(row: VariantReport, stats: LatencyStats) -> None:
    row.latency_ms = {k: round(getattr(stats, f"{k}_ms"), 4) for k in ("p50", "p90", "p99", "mean")}
    row.throughput_per_s = round(stats.throughput_per_s, 2)


def _select(rows: list[VariantReport]) -> tuple[str, str]:
    """The fastest accurate variant that beats the baseline by MIN_GAIN; otherwise the baseline."""
    baseline = next(r for r in rows if r.name == BASELINE)
    base_p50 = baseline.latency_ms["p50"] if baseline.latency_ms else None
    if base_p50 is None:
        return BASELINE, "the baseline could not be timed; serving the original model"
    for row in rows:
        if row.name == BASELINE or row.status != "ok" or row.latency_ms is None:
            continue
        ratio = base_p50 / row.latency_ms["p50"]
        if ratio < 1.0:
            row.status = "rejected"
            row.reason = f"slower than the baseline: p50 {row.latency_ms['p50']:.3f} ms vs {base_p50:.3f} ms"
        elif ratio < 1.0 + MIN_GAIN:
            row.notes.append(f"not measurably faster than the baseline ({ratio:.3f}x, need {1 + MIN_GAIN:.2f}x)")
    winners = [r for r in rows if r.name != BASELINE and r.status == "ok" and r.latency_ms is not None
               and base_p50 / r.latency_ms["p50"] >= 1.0 + MIN_GAIN]
    if not winners:
        return BASELINE, ("no variant was both accurate and at least "
                          f"{MIN_GAIN:.0%} faster than the original; serving the original model")
    best = min(winners, key=lambda r: r.latency_ms["p50"])
    return best.name, (f"{best.name} is the fastest variant within tolerance: "
                       f"{base_p50 / best.latency_ms['p50']:.2f}x the original's p50 latency")


def optimize(
    model: LoadedModel | str | Path | bytes,
    *,
    out_dir: str | Path,
    config: OptimizeConfig | None = None,
    calibration: str | Path | bytes | None = None,
    progress: ProgressCallback | None = None,
) -> OptimizationResult:
    """Write out_dir/model.onnx (the variant to serve) and out_dir/report.json; return the report.

    Raises OptimizerError for a bad model, calibration set or config. A pass that fails becomes a
    failed variant in the report, never an exception.
    """
    config = config or OptimizeConfig()
    config.validate()
    notify = progress or (lambda stage, fraction: None)
    started = time.monotonic()
    build_deadline = started + BUILD_SHARE * config.time_budget_s
    deadline = started + config.time_budget_s
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    notify("validate", 0.0)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    original = loaded.proto
    samples = _samples(loaded, calibration, config)
    int8_mode = _int8_mode(config, samples) if config.precision == "int8" else None
    provider = resolve_provider(config.provider)
    settings = SessionSettings(provider=provider, intra_op_threads=config.threads)
    tolerance = config.tolerance()
    reference = run_outputs(create_session(original.SerializeToString(), settings), samples.holdout)

    built: dict[str, _Built] = {}
    base_row = VariantReport(name=BASELINE, precision="fp32", settings={"source": "the uploaded model"})
    _describe(original, base_row)
    built[BASELINE] = _Built(base_row, original)

    notify("fuse", 0.1)
    fuse = Candidate(FUSED, "fp32", {"pass": "cleanup", "level": "basic"},
                     lambda m, s: cleanup.run(m, cleanup.CleanupConfig(provider=provider), feed=s.holdout[0]))
    built[FUSED] = _build(fuse, original, samples, build_deadline)
    source = built[FUSED].model if built[FUSED].model is not None else original

    plan = candidate_lists.plan(config.precision, provider=provider, int8_mode=int8_mode,
                                method=config.calibration_method, has_calibration=not samples.synthetic)
    for i, candidate in enumerate(plan.candidates):
        stage = "calibrate" if candidate.settings.get("mode") == "static" else "quantize"
        notify(stage, 0.2 + 0.5 * i / max(len(plan.candidates), 1))
        built[candidate.name] = _build(candidate, source, samples, build_deadline)

    notify("evaluate", 0.7)
    for name, b in built.items():
        if name != BASELINE and b.model is not None:
            _evaluate(b.model, reference, samples, settings, tolerance, b.row)

    notify("benchmark", 0.8)
    _benchmark(built, samples, settings, config, deadline)
    rows = [b.row for b in built.values()]
    selected, why = _select(rows)
    selected_model = built[selected].model
    assert selected_model is not None

    model_path = out / "model.onnx"
    _atomic_write(model_path, selected_model.SerializeToString())
    base, chosen = built[BASELINE].row, built[selected].row
    report: dict[str, Any] = {
        "source": {
            "sha256": loaded.sha256, "size_bytes": loaded.size_bytes, "ir_version": loaded.ir_version,
            "original_ir_version": loaded.original_ir_version, "notes": loaded.notes,
            "opsets": {o.domain or "ai.onnx": o.version for o in original.opset_import},
        },
        "provider": provider,
        "config": asdict(config),
        "graph": {"before": inspect(original).to_dict(), "after": inspect(selected_model).to_dict()},
        "calibration": {
            "synthetic": samples.synthetic, "source": samples.source, "method": config.calibration_method,
            "samples": len(samples.calibration), "holdout_samples": len(samples.holdout), "notes": samples.notes,
        },
        "variants": [asdict(r) for r in rows],
        "skipped_candidates": plan.skipped,
        "baseline": BASELINE,
        "selected": selected,
        "selection_reason": why,
        "speedup_p50": round(base.latency_ms["p50"] / chosen.latency_ms["p50"], 3)
        if base.latency_ms and chosen.latency_ms else None,
        "size_ratio": round(chosen.size_bytes / base.size_bytes, 4) if base.size_bytes else None,
        "duration_s": round(time.monotonic() - started, 3),
    }
    _atomic_write(out / "report.json", json.dumps(report, indent=2).encode())
    notify("benchmark", 1.0)
    return OptimizationResult(report=report, model_path=model_path, selected=selected)

"""One variant's life: built in isolation, judged on held-back samples, recorded as one report row.

Shared by the pipeline (one recipe) and the auto search (many): a tool that raises or writes a
model that does not run becomes a failed row with its reason, never a crashed job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import onnx

from optimizer.accuracy import Tolerance, compare, run_outputs
from optimizer.calibration import SampleSet, TimedFeeds
from optimizer.candidates import Candidate
from optimizer.errors import OptimizerError, first_line
from optimizer.latency import LatencyStats
from optimizer.runtime import SessionSettings, create_session


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
    # auto only: p50/p90 from the first, short timing round that decides what is worth more work
    probe_latency_ms: dict[str, float] | None = None


@dataclass
class Built:
    row: VariantReport
    model: onnx.ModelProto | None = None



def describe(model: onnx.ModelProto, row: VariantReport) -> None:
    row.size_bytes = model.ByteSize()
    row.node_count = len(model.graph.node)


def build(candidate: Candidate, source: onnx.ModelProto, samples: SampleSet, deadline: float) -> Built:
    """Run the candidate's pass on `source`; past `deadline` the row is skipped, not built, and a pass still reading
    calibration samples at `deadline` stops there (`TimedFeeds`): the row is skipped, saying so."""
    row = VariantReport(name=candidate.name, precision=candidate.precision, settings=candidate.settings)
    if time.monotonic() >= deadline:
        row.status, row.reason = "skipped", "the job's time budget ran out before this variant was built"
        return Built(row)
    started = time.perf_counter()
    feeds = TimedFeeds(samples.calibration, deadline)
    try:
        result = candidate.build(source, replace(samples, calibration=feeds))
    except Exception as exc:  # noqa: BLE001 - a tool's bug must not end the job
        if feeds.stopped_at is not None:  # whatever a pass wrapped the timeout in: the wrapper's record says so
            row.status, row.reason = "skipped", (
                f"the job's time budget ran out while calibrating this variant (after {feeds.stopped_at} of "
                f"{len(feeds)} calibration samples, {time.perf_counter() - started:.1f} s): it was not built")
        elif isinstance(exc, OptimizerError):
            row.status, row.reason = "failed", str(exc)
        else:
            row.status, row.reason = "failed", f"{type(exc).__name__} in ONNX Runtime's tools: {first_line(exc)}"
        return Built(row)
    finally:
        row.build_s = round(time.perf_counter() - started, 3)
    row.changes, row.notes = result.changes, result.notes
    describe(result.model, row)
    return Built(row, result.model)


def evaluate(model: onnx.ModelProto, reference: list[dict], samples: SampleSet, settings: SessionSettings,
             tolerance: Tolerance, row: VariantReport) -> None:
    """Judge accuracy on the held-back samples; a variant that cannot run there fails."""
    try:
        session = create_session(model.SerializeToString(), settings)
        outputs = run_outputs(session, samples.holdout)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types
        row.status, row.reason = "failed", f"does not run on the held-back samples: {first_line(exc)}"
        return
    report = compare(reference, outputs, tolerance)
    row.accuracy = report.to_dict()
    if not report.passed:
        row.status, row.reason = "rejected", f"accuracy below tolerance: {report.reason}"


def set_latency(row: VariantReport, stats: LatencyStats) -> None:
    row.latency_ms = {k: round(getattr(stats, f"{k}_ms"), 4) for k in ("p50", "p90", "p99", "mean")}
    row.throughput_per_s = round(stats.throughput_per_s, 2)

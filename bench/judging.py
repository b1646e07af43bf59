"""How a quantized variant of a real model did against FP32 on held-back samples: the worst figures the strict
gate reads, and both gates' verdicts. Shared by the side-by-side benches (equalize, smooth, bias_correction)."""

from __future__ import annotations

from typing import Any

import onnx

from optimizer.accuracy import AccuracyReport, Tolerance, compare, run_outputs
from optimizer.latency import measure_batches, paired_ratio
from optimizer.runtime import SessionSettings, create_session


def worst(report: AccuracyReport) -> tuple[float, float, float]:
    """Worst whole-output cosine, worst channel-slice cosine and worst slice error (nan where none)."""
    outs = report.outputs.values()
    cos = min((o.cosine for o in outs if o.cosine is not None), default=float("nan"))
    slices = [o.slices for o in outs if o.slices]
    slice_cos = min((s.worst_cosine for s in slices if s.worst_cosine is not None), default=float("nan"))
    slice_err = max((s.worst_error for s in slices), default=float("nan"))
    return cos, slice_cos, slice_err


def judge(model: onnx.ModelProto, reference: list[dict], holdout: list[dict],
          task: dict[str, str]) -> dict[str, Any]:
    """`model` run on `holdout` against `reference`: worst figures, the strict verdict and its reason, and the
    verdict by the model's declared task metrics when it has any."""
    outputs = run_outputs(create_session(model.SerializeToString(), SessionSettings()), holdout)
    strict = compare(reference, outputs, Tolerance())
    cos, slice_cos, slice_err = worst(strict)
    row = {"cos": cos, "slice": slice_cos, "err": slice_err, "strict": strict.passed, "why": strict.reason or ""}
    if task:
        row["task"] = compare(reference, outputs, Tolerance(metrics=task)).passed
    return row


def print_speedups(timed: dict[str, bytes], feed: dict, judged: dict[str, str], seconds: float, width: int) -> None:
    """Time every model of `timed` interleaved with its "fp32" entry at batch 1 (`seconds` each) and print each one's
    p50 and round-by-round speed-up over FP32 [95%], beside what `judged` says of its accuracy."""
    stats = measure_batches(timed, feed, SessionSettings(), batch_sizes=(1,), min_runs=20,
                            target_seconds=seconds * len(timed))[1]
    print(f"  FP32 p50 {stats['fp32'].p50_ms:.2f} ms, {len(stats['fp32'].round_ms)} rounds")
    for name, s in stats.items():
        if name != "fp32":
            r = paired_ratio(stats["fp32"], s)
            print(f"  {name:{width}} p50 {s.p50_ms:8.2f} ms  {r.median:.2f}x FP32 [{r.low:.2f}-{r.high:.2f}]  "
                  f"{judged[name]}", flush=True)

"""How a quantized variant of a real model did against FP32 on held-back samples: the worst figures the strict
gate reads, and both gates' verdicts. Shared by the side-by-side benches (equalize, smooth, bias_correction)."""

from __future__ import annotations

from typing import Any

import onnx

from optimizer.accuracy import AccuracyReport, Tolerance, compare, run_outputs
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

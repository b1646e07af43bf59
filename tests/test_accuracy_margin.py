"""The repair's accuracy margin reads the metric that gates each output, so its sign is the pass/fail verdict.

References are real ONNX Runtime outputs of built models; candidates are those outputs damaged in the ways
quantization damages them (noise, one channel off, values flipped across a mask threshold, NaN, a wrong shape).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from optimizer.accuracy import Tolerance, agreement_lower_bound, compare, run_outputs
from optimizer.auto import accuracy_margin
from optimizer.runtime import create_session
from tests import models


def _reference(model: onnx.ModelProto, samples: int = 6) -> list[dict[str, np.ndarray]]:
    feeds = [models.random_feed(model, batch=2, seed=i) for i in range(samples)]
    return run_outputs(create_session(model.SerializeToString()), feeds)


def _damaged(reference: list[dict[str, np.ndarray]], seed: int) -> list[list[dict[str, np.ndarray]]]:
    """Candidates from harmless to ruined: relative noise, one channel scaled, a few values pushed across zero."""
    rng = np.random.default_rng(seed)
    out = []
    for scale in (0.0, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0):
        out.append([{k: v + scale * np.std(v) * rng.normal(size=v.shape).astype(v.dtype) for k, v in run.items()}
                    for run in reference])
    for factor in (0.9, 0.5, 0.0):  # the last channel only: whole-tensor cosine barely moves, its slice does
        runs = []
        for run in reference:
            damaged = {}
            for k, v in run.items():
                v = v.copy()
                v[..., -1] *= factor
                damaged[k] = v
            runs.append(damaged)
        out.append(runs)
    for share in (0.001, 0.02, 0.2):  # a share of the values negated: flips sign (mask) and argmax (top-1)
        out.append([{k: np.where(rng.random(v.shape) < share, -v, v).astype(v.dtype) for k, v in run.items()}
                    for run in reference])
    return out


def _check(reference: list[dict[str, np.ndarray]], tolerance: Tolerance, seed: int) -> Counter:
    verdicts: Counter = Counter()
    for candidate in _damaged(reference, seed):
        report = compare(reference, candidate, tolerance)
        margin = accuracy_margin(report.to_dict(), tolerance)
        assert (margin >= 0) == report.passed, (margin, report.reason)
        verdicts[report.passed] += 1
    return verdicts


def test_the_margin_sign_is_the_verdict_for_every_metric_kind() -> None:
    # 140 samples of 2 rows: top-1 gates on its 95% lower bound, and 268 rows all agreeing prove 99%
    detector, mlp = _reference(models.detector()), _reference(models.mlp(), samples=140)
    cases = [
        (detector, Tolerance()),  # default: cosine and slices (cosine and error) of [N, boxes, 4+classes]
        (detector, Tolerance(min_slice_cosine=None, max_slice_error=0.1)),
        (detector, Tolerance(max_abs=0.5)),
        (detector, Tolerance(metrics={"detections": "mask:0"})),
        (detector, Tolerance(metrics={"detections": "mask:0.5"}, min_top1=0.95)),
        (mlp, Tolerance()),  # default on class scores: cosine and top-1
        (mlp, Tolerance(metrics={"logits": "top1"})),
        (mlp, Tolerance(metrics={"logits": "top1"}, min_top1=0.9, max_abs=2.0)),
        (mlp, Tolerance(metrics={"logits": "mask:0"})),
    ]
    for i, (reference, tolerance) in enumerate(cases):
        verdicts = _check(reference, tolerance, seed=i)
        assert verdicts[True] and verdicts[False], (tolerance, verdicts)  # both verdicts met: the test can fail


def test_a_declared_metric_alone_sets_the_margin() -> None:
    """Logits flipped in a few rows lose little cosine but top-1: the top1-gated margin reads top-1 only."""
    reference = _reference(models.mlp(), samples=13)  # 26 rows all agreeing prove the 90% asked
    candidate = [{"logits": v["logits"] * 0.98} for v in reference]  # scaled: same argmax, cosine exactly 1
    strict, top1 = Tolerance(min_cosine=0.999), Tolerance(metrics={"logits": "top1"}, min_top1=0.9)
    # top-1 gates on its 95% lower bound: 26 of 26 rows agreeing prove less than 100%
    assert accuracy_margin(compare(reference, candidate, top1).to_dict(), top1) == pytest.approx(
        agreement_lower_bound(26, 26) - 0.9)
    flipped = [{"logits": -v["logits"]} for v in reference]  # every argmax wrong, cosine -1
    assert accuracy_margin(compare(reference, flipped, top1).to_dict(), top1) == -0.9
    assert accuracy_margin(compare(reference, flipped, strict).to_dict(), strict) < -1.9


def test_failures_without_a_metric_and_nonfinite_values_are_minus_infinity() -> None:
    reference = _reference(models.mlp())
    tolerance = Tolerance()
    nan = [{"logits": np.full_like(v["logits"], np.nan)} for v in reference]
    assert accuracy_margin(compare(reference, nan, tolerance).to_dict(), tolerance) == float("-inf")
    wrong_shape = [{"logits": v["logits"][:, :3]} for v in reference]
    report = compare(reference, wrong_shape, tolerance)
    assert not report.passed
    assert accuracy_margin(report.to_dict(), tolerance) == float("-inf")
    assert accuracy_margin(None, tolerance) == float("-inf")
    # an output that is measured but not checked cannot lower the margin
    unchecked = Tolerance(outputs=[])
    assert accuracy_margin(compare(reference, nan, unchecked).to_dict(), unchecked) == 0.0

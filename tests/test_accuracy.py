"""optimizer.accuracy: the guard that decides whether a variant still computes what the original does."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optimizer.accuracy import (
    Tolerance,
    ToleranceError,
    agreement_lower_bound,
    compare,
    default_channel_axis,
    is_class_scores,
    rows_to_prove,
    run_outputs,
)
from optimizer.errors import OptimizerError
from optimizer.pipeline import accuracy_notes
from optimizer.runtime import SessionSettings, create_session
from tests.models import cnn, random_feed


def _logits(rows: int = 200, classes: int = 10, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"logits": rng.normal(0, 3, (1, classes)).astype(np.float32)} for _ in range(rows)]


def _detections(samples: int = 4, boxes: int = 100, classes: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A detector head [1, boxes, 4+classes]: xyxy boxes in pixels (0-320) beside sigmoid scores (0-1)."""
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(samples):
        xy = rng.uniform(0, 240, (1, boxes, 2))
        wh = rng.uniform(4, 80, (1, boxes, 2))
        scores = 1 / (1 + np.exp(-rng.normal(-2, 2, (1, boxes, classes))))
        runs.append({"detections": np.concatenate([xy, xy + wh, scores], axis=-1).astype(np.float32)})
    return runs


def _copy(runs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    return [{k: v.copy() for k, v in run.items()} for run in runs]


def _scaled(runs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Same argmax, off by 0.1%: more than float rounding (an exact copy's top-1 needs no proof), as INT8 would be."""
    return [{k: v * np.float32(1.001) for k, v in run.items()} for run in runs]


def test_identical_outputs_pass_with_exact_metrics() -> None:
    ref = _logits()
    report = compare(ref, _copy(ref), Tolerance(min_top1=0.98))  # 200 rows all agreeing prove 98.7%, not 99%
    out = report.outputs["logits"]
    assert report.passed and report.reason is None and report.samples == 200
    assert out.max_abs == 0.0 and out.mean_abs == 0.0 and out.relative_error == 0.0
    assert out.cosine == pytest.approx(1.0) and out.top1 == 1.0 and out.nonfinite == 0
    assert out.elements == 2000 and out.shape == [1, 10]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_candidate_fails(bad: float) -> None:
    ref = _logits(rows=20)
    cand = _copy(ref)
    cand[3]["logits"][0, 2] = bad
    cand[7]["logits"][0, 5] = bad
    report = compare(ref, cand)
    assert not report.passed
    assert report.outputs["logits"].nonfinite == 2
    assert "'logits'" in report.reason and "2 NaN/Inf" in report.reason


def test_nan_where_the_reference_is_nan_is_left_out() -> None:
    ref = _logits(rows=20)
    ref[0]["logits"][0, 0] = np.nan
    cand = _copy(ref)
    report = compare(ref, cand, Tolerance(min_top1=0.85))  # 20 rows all agreeing prove 88%
    assert report.passed
    assert report.outputs["logits"].elements == 200 and report.outputs["logits"].cosine == pytest.approx(1.0)


def test_swapped_class_scores_fail_on_top1_while_cosine_passes() -> None:
    ref = _logits(rows=200)
    cand = _copy(ref)
    # In 6 of 200 rows (3%) swap the top two classes: a small change in values, a wrong prediction.
    for run in cand[:6]:
        row = run["logits"][0]
        first, second = np.argsort(row)[-1], np.argsort(row)[-2]
        row[first], row[second] = row[second], row[first]
    report = compare(ref, cand)
    out = report.outputs["logits"]
    assert out.cosine > 0.99
    assert out.top1 == pytest.approx(194 / 200)
    assert not report.passed
    assert "top-1 agreement 97.00% < limit 99.00%" in report.reason
    assert compare(ref, cand, Tolerance(min_top1=0.94)).passed  # 194 of 200 prove 94.3%


def test_ties_in_the_reference_count_as_agreement() -> None:
    ref = [{"logits": np.array([[1.0, 3.0, 3.0, 0.0]], np.float32)}]
    cand = [{"logits": np.array([[1.0, 2.9, 3.1, 0.0]], np.float32)}]
    assert compare(ref, cand).outputs["logits"].top1 == 1.0


def test_detector_with_broken_scores_fails_on_the_slice_check() -> None:
    ref = _detections()
    rng = np.random.default_rng(1)
    cand = _copy(ref)
    for run in cand:
        det = run["detections"]
        det[..., :4] += rng.normal(0, 0.05, det[..., :4].shape)  # boxes fine
        det[..., 4:] = 0.0  # every score rounded to zero, as one INT8 scale for 0-320 does
    report = compare(ref, cand)
    out = report.outputs["detections"]
    assert out.cosine > 0.999, "the whole tensor looks fine: that is the trap"
    assert not report.passed
    assert out.slices is not None and out.slices.axis == 2 and out.slices.count == 7
    assert out.slices.worst_cosine_index in (4, 5, 6) and out.slices.worst_cosine == 0.0
    assert f"slice {out.slices.worst_cosine_index} of 7 along axis 2" in report.reason
    assert "cosine similarity 0.0000 < limit 0.9800" in report.reason


def test_detector_with_scrambled_scores_fails_on_the_slice_check() -> None:
    ref = _detections()
    rng = np.random.default_rng(2)
    cand = _copy(ref)
    for run in cand:
        scores = run["detections"][0, :, 4:]
        scores[:] = scores[rng.permutation(len(scores))]  # plausible values, wrong boxes
    report = compare(ref, cand)
    out = report.outputs["detections"]
    assert out.cosine > 0.999
    assert not report.passed and out.slices.worst_cosine < 0.9
    assert "along axis 2 has cosine similarity" in report.reason


def test_detector_with_tiny_noise_passes() -> None:
    ref = _detections()
    rng = np.random.default_rng(3)
    cand = _copy(ref)
    for run in cand:
        det = run["detections"]
        det[..., :4] += rng.normal(0, 0.1, det[..., :4].shape)
        det[..., 4:] += rng.normal(0, 1e-3, det[..., 4:].shape)
    report = compare(ref, cand)
    out = report.outputs["detections"]
    assert report.passed, report.reason
    assert out.slices.worst_cosine > 0.999 and out.slices.worst_error < 0.02


def test_slice_with_an_offset_is_judged_by_its_own_range() -> None:
    """Values 300-310: scrambling them keeps cosine ~1.0, but the error is most of the slice's range."""
    rng = np.random.default_rng(4)
    ref = [{"y": np.stack([rng.uniform(0, 1, (1, 50)), rng.uniform(300, 310, (1, 50))], axis=-1)}]
    cand = _copy(ref)
    cand[0]["y"][0, :, 1] = cand[0]["y"][0, rng.permutation(50), 1]
    report = compare(ref, cand)
    s = report.outputs["y"].slices
    assert s.worst_cosine > 0.999 and s.worst_error_index == 1 and s.worst_error > 0.5
    assert not report.passed and "slice 1 of 2 along axis 2 is off by" in report.reason
    assert "of its own range" in report.reason
    assert compare(ref, cand, Tolerance(min_slice_cosine=None, max_slice_error=None)).passed


def test_dead_and_constant_slices_do_not_fail_on_noise() -> None:
    """An all-zero channel has no cosine; a constant one is judged against the whole tensor's range."""
    rng = np.random.default_rng(5)
    feature_map = rng.normal(0, 1, (2, 4, 8, 8))
    feature_map[:, 1] = 0.0
    feature_map[:, 2] = 7.0
    ref = [{"features": feature_map}]
    cand = [{"features": feature_map + rng.normal(0, 1e-4, feature_map.shape)}]
    report = compare(ref, cand)
    s = report.outputs["features"].slices
    assert report.passed, report.reason
    assert s.axis == 1 and s.count == 4 and s.worst_error < 0.01


def test_only_named_outputs_can_fail() -> None:
    ref = [{**run, "aux": np.ones((1, 3), np.float32)} for run in _logits(rows=5)]
    cand = _copy(ref)
    for run in cand:
        run["aux"] = -run["aux"]
    assert not compare(ref, cand).passed
    report = compare(ref, cand, Tolerance(outputs=["logits"], min_top1=0.6))  # 5 rows all agreeing prove 64.9%
    assert report.passed
    aux = report.outputs["aux"]
    assert not aux.checked and not aux.passed and aux.cosine == pytest.approx(-1.0)


def test_tolerance_naming_an_unknown_output_is_refused() -> None:
    ref = _logits(rows=2)
    with pytest.raises(ToleranceError, match=r"'scores'.*\['logits'\]") as info:
        compare(ref, _copy(ref), Tolerance(outputs=["scores"]))
    assert isinstance(info.value, OptimizerError)


def test_impossible_tolerances_are_refused() -> None:
    with pytest.raises(ToleranceError, match="min_cosine"):
        Tolerance(min_cosine=1.5)
    with pytest.raises(ToleranceError, match="min_top1"):
        Tolerance(min_top1=99)
    with pytest.raises(ToleranceError, match="max_abs"):
        Tolerance(max_abs=-1)


def test_channel_axis_that_does_not_exist_is_refused() -> None:
    ref = _logits(rows=2)
    with pytest.raises(ToleranceError, match="channel_axis 3 does not exist in output 'logits'"):
        compare(ref, _copy(ref), Tolerance(channel_axis=3))


def test_max_abs_limit() -> None:
    ref = _logits(rows=10)
    cand = _copy(ref)
    cand[0]["logits"] += 0.01
    assert compare(ref, cand, Tolerance(max_abs=0.1, min_top1=0.75)).passed  # 10 rows all agreeing prove 78.7%
    report = compare(ref, cand, Tolerance(max_abs=0.001))
    assert not report.passed and "max absolute difference 0.01 > limit 0.001" in report.reason


def test_shape_mismatch_and_missing_output_fail() -> None:
    ref = _logits(rows=3)
    wrong_shape = [{"logits": np.zeros((1, 9), np.float32)} for _ in range(3)]
    report = compare(ref, wrong_shape)
    assert not report.passed and "shape [1, 9] differs from the original's [1, 10]" in report.reason
    report = compare(ref, [{"other": r["logits"]} for r in ref])
    assert not report.passed and "'logits': missing" in report.reason
    with pytest.raises(ValueError, match="3 reference runs but 2 candidate runs"):
        compare(ref, ref[:2])


def test_to_dict_is_plain_json_without_nan() -> None:
    ref = _detections(samples=2)
    cand = _copy(ref)
    cand[0]["detections"][0, 0, 0] = np.nan
    data = compare(ref, cand).to_dict()
    text = json.dumps(data, allow_nan=False)  # raises on NaN or numpy types
    assert data["passed"] is False and data["outputs"]["detections"]["nonfinite"] == 1
    assert json.loads(text)["outputs"]["detections"]["cosine"] is None
    ok = compare(ref, _copy(ref)).to_dict()
    json.dumps(ok, allow_nan=False)
    assert ok["outputs"]["detections"]["slices"]["count"] == 7


def test_class_score_and_channel_axis_rules() -> None:
    assert is_class_scores("logits", np.zeros((2, 10), np.float32))
    assert not is_class_scores("pooled_embedding", np.zeros((2, 384), np.float32))
    assert not is_class_scores("logits", np.zeros((2, 1), np.float32))
    assert not is_class_scores("labels", np.zeros((2, 10), np.int64))
    assert not is_class_scores("last_hidden_state", np.zeros((2, 8, 64), np.float32))
    assert is_class_scores("token_logits", np.zeros((2, 8, 100), np.float32))
    assert default_channel_axis([1, 100, 7]) == 2
    assert default_channel_axis([1, 84, 8400]) == 1
    assert default_channel_axis([1, 21, 64, 64]) == 1
    assert default_channel_axis([1, 10]) is None


def test_class_outputs_override_the_guess() -> None:
    rng = np.random.default_rng(6)
    ref = [{"embedding": rng.normal(0, 1, (4, 16)).astype(np.float32)}]
    assert compare(ref, _copy(ref)).outputs["embedding"].top1 is None
    assert compare(ref, _copy(ref), Tolerance(class_outputs=["embedding"])).outputs["embedding"].top1 == 1.0


def test_real_sessions_same_model_passes_other_weights_fail() -> None:
    model = cnn(seed=0)
    feeds = [random_feed(model, batch=2, seed=i) for i in range(4)]
    unfused = create_session(model.SerializeToString(), SessionSettings(optimization_level="disabled"))
    fused = create_session(model.SerializeToString(), SessionSettings(optimization_level="all"))
    ref = run_outputs(unfused, feeds)
    assert len(ref) == 4 and ref[0]["logits"].shape == (2, 10)
    report = compare(ref, run_outputs(fused, feeds), Tolerance(min_top1=0.7))  # 8 rows all agreeing prove 74.7%
    assert report.passed, report.reason
    assert report.outputs["logits"].max_abs < 1e-4 and report.outputs["logits"].top1 == 1.0
    other = create_session(cnn(seed=1).SerializeToString())
    report = compare(ref, run_outputs(other, feeds))
    assert not report.passed and "'logits'" in report.reason


# --- declared task metrics (Tolerance.metrics) -------------------------------------------------------------


def _prob_maps(flip: float, samples: int = 4, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """DBNet-like saturated maps [1, 1, 64, 64] (text ~10% of pixels, values 0 or 1) and a copy in which a
    `flip` share of pixels crossed to the other side, as INT8 does along text borders."""
    rng = np.random.default_rng(seed)
    ref, cand = [], []
    for _ in range(samples):
        m = (rng.random((1, 1, 64, 64)) < 0.1).astype(np.float32)
        c = m.copy()
        flat = c.reshape(-1)
        idx = rng.choice(flat.size, size=int(round(flip * flat.size)), replace=False)
        flat[idx] = 1.0 - flat[idx]
        ref.append({"maps": m, "aux": m.mean(keepdims=True)})
        cand.append({"maps": c, "aux": m.mean(keepdims=True)})
    return ref, cand


def test_mask_metric_gates_a_saturated_map_on_the_worst_samples_region_iou() -> None:
    ref, cand = _prob_maps(flip=0.0005)  # 2 of 4096 pixels per map cross: ~0.5% of a ~410-pixel text region
    strict = compare(ref, cand)
    assert not strict.passed and strict.outputs["maps"].cosine < 0.999
    task = compare(ref, cand, Tolerance(metrics={"maps": "mask:0.3"}))
    assert task.passed, task.reason
    out = task.outputs["maps"]
    assert out.metric == "mask:0.3" and 0.99 <= out.mask_iou < 1.0
    assert out.mask_agreement == pytest.approx(0.9995, abs=1e-4) and out.cosine is not None  # still reported
    # 99.5% of pixels agreeing is a text IoU of ~0.95 (text is 10% of the page): the boxes change, so it fails
    worse = compare(*_prob_maps(flip=0.005), Tolerance(metrics={"maps": "mask:0.3"}))
    bad = worse.outputs["maps"]
    assert not worse.passed and bad.mask_agreement == pytest.approx(0.995, abs=1e-3) and bad.mask_iou < 0.96
    assert f"IoU {bad.mask_iou:.2%} < limit 99.00%" in worse.reason and "99.51% of all positions agree" in worse.reason


def test_mask_metric_fails_on_one_bad_sample_among_good_ones() -> None:
    """Pooled over samples, one page whose text region is gone hides among good pages; per sample it decides."""
    ref, cand = _prob_maps(flip=0.0, samples=12)
    cand[7] = {"maps": np.zeros_like(ref[7]["maps"]), "aux": cand[7]["aux"]}  # the detector sees nothing
    report = compare(ref, cand, Tolerance(metrics={"maps": "mask:0.3"}))
    out = report.outputs["maps"]
    assert out.mask_agreement > 0.99  # the pooled share would have passed it
    assert not report.passed and out.mask_iou == 0.0 and out.mask_iou_sample == 7
    empty = [{"maps": np.zeros((1, 1, 8, 8), np.float32)}]  # nothing above the threshold in either: agrees
    assert compare(empty, empty, Tolerance(metrics={"maps": "mask:0.3"})).outputs["maps"].mask_iou == 1.0


def test_worst_sample_cosine_is_reported_beside_the_pooled_cosine() -> None:
    rng = np.random.default_rng(5)
    ref = [{"y": rng.normal(0, 1, (1, 256)).astype(np.float32)} for _ in range(10)]
    cand = [{"y": r["y"] + rng.normal(0, 0.01, (1, 256)).astype(np.float32)} for r in ref]
    cand[3] = {"y": ref[3]["y"] + rng.normal(0, 0.3, (1, 256)).astype(np.float32)}  # one input much worse
    out = compare(ref, cand).outputs["y"]
    assert out.cosine > 0.99 and out.worst_sample_cosine < 0.97


def test_top1_metric_gates_per_time_step_classes() -> None:
    """A CTC recogniser's [1, T, C] softmax: noise that keeps each step's argmax passes top1, fails cosine."""
    rng = np.random.default_rng(3)
    ref, keep, swap = [], [], []
    for _ in range(52):  # 52 lines all agreeing prove 95%
        logits = rng.normal(0, 1, (1, 40, 50)).astype(np.float32)
        logits[0, np.arange(40), rng.integers(0, 50, 40)] += 8.0
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        noisy = np.clip(p + rng.normal(0, 0.06, p.shape).astype(np.float32) * (p < 0.5), 0, None)
        ref.append({"softmax_11.tmp_0": p})
        keep.append({"softmax_11.tmp_0": noisy})
        wrong = noisy.copy()
        wrong[0, :4] = np.roll(wrong[0, :4], 1, axis=-1)  # 4 of 40 steps read another character
        swap.append({"softmax_11.tmp_0": wrong})
    tol = Tolerance(metrics={"softmax_11.tmp_0": "top1"}, min_top1=0.95)
    assert not compare(ref, keep).passed  # strict default: cosine/slices fail
    passed = compare(ref, keep, tol)
    assert passed.passed, passed.reason
    assert passed.outputs["softmax_11.tmp_0"].top1 == 1.0
    failed = compare(ref, swap, tol)
    assert not failed.passed and failed.outputs["softmax_11.tmp_0"].top1 == pytest.approx(0.9)


def test_outputs_not_named_keep_the_strict_gate() -> None:
    ref, cand = _prob_maps(flip=0.0005)
    for c in cand:
        c["aux"] = -c["aux"]  # the unnamed output is broken
    report = compare(ref, cand, Tolerance(metrics={"maps": "mask:0.3"}))
    assert not report.passed and "'aux'" in report.reason and report.outputs["maps"].passed


@pytest.mark.parametrize("metrics", [{"maps": "iou"}, {"maps": "mask:"}, {"maps": "mask:abc"}, {"maps": "mask:nan"}])
def test_unknown_metrics_are_refused(metrics: dict) -> None:
    with pytest.raises(ToleranceError, match="unknown metric"):
        Tolerance(metrics=metrics)


def test_metric_for_a_missing_output_or_without_classes_is_refused() -> None:
    ref, cand = _prob_maps(flip=0.0)
    with pytest.raises(ToleranceError, match="'boxes'"):
        compare(ref, cand, Tolerance(metrics={"boxes": "top1"}))
    with pytest.raises(ToleranceError, match="classes on the last axis"):
        compare(ref, cand, Tolerance(metrics={"aux": "top1"}))


def test_top1_says_how_many_rows_it_rests_on_and_how_low_it_may_really_be() -> None:
    few, many = _logits(rows=5), _logits(rows=400)
    for ref, rows in ((few, 5), (many, 400)):
        out = compare(ref, _copy(ref)).outputs["logits"]
        assert (out.top1, out.top1_rows) == (1.0, rows)
    assert compare(few, _copy(few)).outputs["logits"].top1_lower_95 == pytest.approx(0.6488, abs=1e-4)
    assert compare(many, _copy(many)).outputs["logits"].top1_lower_95 > 0.99
    # the Wilson bound: 268 rows all agreeing are the fewest that prove 99% at 95% confidence
    assert rows_to_prove(0.99) == 268
    assert agreement_lower_bound(268, 268) >= 0.99 > agreement_lower_bound(267, 267)
    assert agreement_lower_bound(0, 10) == 0.0 and agreement_lower_bound(98, 100) == pytest.approx(0.9413, abs=1e-4)


def test_the_report_warns_when_a_passing_top1_rests_on_too_few_rows() -> None:
    """A top-1 that few rows cannot prove is no longer served with a note: it fails as unproven
    (tests/test_accuracy_proof.py); what passes on a lower min_top1 keeps the cosine and selection notes."""
    few, many = _logits(rows=5), _logits(rows=400)
    unproven = compare(few, _scaled(few))
    assert not unproven.passed and "so few prove only 64.9%" in unproven.reason
    assert "268 rows all agreeing prove it" in unproven.reason
    tol = Tolerance(min_top1=0.6)
    notes = accuracy_notes(compare(few, _scaled(few), tol).to_dict(), 5, judged=(3, 3))
    assert len(notes) == 2
    # the logits are gated by cosine too: 0.9^5 = 59% of the time 5 samples miss a 1-in-10 breakage
    assert notes[0].startswith("output 'logits': cosine 1.0000 was measured on 5 held-back sample(s)")
    assert "shows no broken one among 5 59% of the time; 20 or more samples" in notes[0]
    assert notes[1].startswith("this variant was chosen among 3 variants judged on these same 5 held-back sample(s)")
    assert "selection bias" in notes[1]
    assert accuracy_notes(compare(few, _scaled(few), tol).to_dict(), 5) == notes[:1]
    assert accuracy_notes(compare(few, _scaled(few), tol).to_dict(), 5, judged=(1, 1)) == notes[:1]
    assert accuracy_notes(compare(many, _copy(many)).to_dict(), 400) == []
    assert accuracy_notes(None, 5, judged=(3, 3)) == []  # the original: nothing measured


def test_cosine_and_selection_notes_without_a_top1_note() -> None:
    """An embedding (cosine-gated, no argmax worth a bound) on 8 held-back samples, chosen by auto among 2: the
    cosine note and the selection-bias note appear though there is no top-1 note; on 20 samples only the latter."""
    rng = np.random.default_rng(1)
    tol = Tolerance(min_top1=0.0)  # top-1 of an embedding means nothing: no bound can fall under 0
    for samples, expected in ((8, ["cosine", "auto"]), (20, ["auto"])):
        ref = [{"embedding": rng.normal(0, 1, (1, 32)).astype(np.float32)} for _ in range(samples)]
        notes = accuracy_notes(compare(ref, _copy(ref), tol).to_dict(), samples, judged=(2, 2))
        assert ["auto" if n.startswith("this variant") else n.split(": ")[1].split()[0] for n in notes] == expected
        assert f"among 2 variants judged on these same {samples} held-back sample(s)" in notes[-1]
    cosine_note = accuracy_notes(compare(ref[:8], _copy(ref[:8]), tol).to_dict(), 8)[0]
    assert "measured on 8 held-back sample(s)" in cosine_note and "among 8 43% of the time" in cosine_note


def test_steps_of_one_sequence_count_as_one_unit_in_the_bound() -> None:
    """A CTC line's 20 steps agree or drift together: 5 lines prove what 5 rows do, not what 100 rows would."""
    rng = np.random.default_rng(3)
    ref = [{"logits": rng.normal(0, 3, (1, 20, 5)).astype(np.float32)} for _ in range(5)]
    out = compare(ref, _scaled(ref)).outputs["logits"]
    assert (out.top1, out.top1_rows, out.top1_units) == (1.0, 100, 5)
    assert out.top1_lower_95 == pytest.approx(agreement_lower_bound(5, 5)) and out.top1_lower_95 < 0.65
    reason = compare(ref, _scaled(ref)).reason
    assert "on 5 sequences, but so few prove only 64.9%" in reason

"""A top-1 gate passes only on what the held-back samples prove (its 95% lower bound), never on a lucky few rows.

A reviewer's Magika upload was served at 100% top-1 on 8 held-back rows (bound 74.7%) and agreed 96.3% on 300
fresh inputs, under its 99% gate. These tests build a classifier (tests.models.mlp) and run the real pipeline.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from optimizer.accuracy import Tolerance, agreement_lower_bound, compare, rows_to_prove
from optimizer.latency import LatencyStats, paired_ratio
from optimizer.pipeline import Noise, OptimizeConfig, _confirmed, accuracy_notes, optimize, samples_to_upload
from optimizer.variants import VariantReport
from tests import models

FAST = {"benchmark_seconds": 0.2, "batch_sizes": (1,), "precision": "int8", "int8_mode": "dynamic"}


def _npz(samples: int, rows: int, seed: int = 0) -> bytes:
    """`samples` calibration samples of `rows` rows each for tests.models.mlp (20% of the samples are held back)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, features=rng.normal(0, 1, (samples, rows, 64)).astype(np.float32))
    return buf.getvalue()


def _int8(report: dict) -> dict:
    return next(v for v in report["variants"] if v["precision"] == "int8")


def _logits(rows: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"logits": rng.normal(0, 1, (1, 10)).astype(np.float32)} for _ in range(rows)]


def _copy(runs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """The same argmax everywhere, off by 0.1%: more than float rounding (which needs no proof), as INT8 would be."""
    return [{k: v * np.float32(1.001) for k, v in run.items()} for run in runs]


def test_all_of_a_few_rows_agreeing_is_unproven_and_says_what_proves_it() -> None:
    few = _logits(8)
    report = compare(few, _copy(few))
    out = report.outputs["logits"]
    assert (out.top1, out.top1_rows, out.passed, out.unproven, report.passed, report.unproven) == (
        1.0, 8, False, True, False, True)
    assert report.reason.startswith("output 'logits': unproven: top-1 agreement 100.0% reaches the 99.0% asked for "
                                    "on 8 rows, but so few prove only 74.7% (95% lower bound)")
    assert "268 rows all agreeing prove it (268 held-back samples like these, not 8)" in report.reason
    assert "or min_top1 0.747 is what these prove" in report.reason
    assert out.samples_to_prove == 268
    # what the reason offers does prove it: the lower min_top1 on these rows, or 268 rows all agreeing
    assert compare(few, _copy(few), Tolerance(min_top1=0.747)).passed
    many = _logits(268)
    assert compare(many, _copy(many)).passed and not compare(many[:267], _copy(many[:267])).passed


def test_unproven_is_only_said_of_a_variant_that_passes_as_measured() -> None:
    ref = _logits(8)
    cand = _copy(ref)
    cand[0]["logits"] = -cand[0]["logits"]  # a real disagreement: failed, not unproven
    report = compare(ref, cand)
    assert not report.passed and not report.unproven and "unproven" not in report.reason
    # 100% cannot be proven by any number of rows: the reason says so, and what these rows prove
    perfect = compare(ref, _copy(ref), Tolerance(min_top1=1.0))
    assert perfect.unproven and "no number of rows proves 100.0%" in perfect.reason
    assert perfect.outputs["logits"].samples_to_prove is None


def test_rows_to_prove_at_the_measured_rate() -> None:
    assert rows_to_prove(0.99) == 268 and rows_to_prove(0.99, 0.99) is None and rows_to_prove(1.0) is None
    n = rows_to_prove(0.95, 0.99)
    assert agreement_lower_bound(0.99 * n, n) >= 0.95 > agreement_lower_bound(0.99 * (n - 1), n - 1)
    # 1336 samples hold back 268 at 20% (ceil(0.2 * n)); 1335 hold back 267
    assert samples_to_upload(268, 0.2) == 1336 and samples_to_upload(3, 0.2) == 6


def test_a_sequence_output_counts_one_unit_per_sequence_in_what_proves_it() -> None:
    rng = np.random.default_rng(3)
    ref = [{"logits": rng.normal(0, 3, (1, 20, 5)).astype(np.float32)} for _ in range(5)]
    report = compare(ref, _copy(ref), Tolerance(metrics={"logits": "top1"}))
    assert report.unproven and "on 5 sequences" in report.reason
    assert "268 sequences all agreeing prove it (268 held-back samples like these, not 5)" in report.reason


def test_an_int8_classifier_agreeing_on_a_few_rows_is_not_served_and_says_how_many_samples_prove_it(
        tmp_path: Path) -> None:
    model = models.mlp().SerializeToString()
    result = optimize(model, out_dir=tmp_path, calibration=_npz(40, 1), config=OptimizeConfig(min_top1=0.97, **FAST))
    report = result.report
    int8 = _int8(report)
    assert report["calibration"]["holdout_samples"] == 8
    assert int8["accuracy"]["outputs"]["logits"]["top1"] == 1.0  # all 8 held-back rows agree
    assert int8["status"] == "rejected" and result.selected != int8["name"]
    assert next(v for v in report["variants"] if v["name"] == "fused")["status"] == "ok"  # FP32: nothing to prove
    # 97%: 88 rows all agreeing prove it, 88 held-back samples of 1 row: 436 to upload (ceil(0.2 * 436) = 88)
    assert int8["reason"].startswith("output 'logits': unproven: top-1 agreement 100.0% reaches the 97.0% asked for")
    assert "88 rows all agreeing prove it" in int8["reason"]
    assert int8["reason"].endswith("a calibration set of 436 or more samples holds back that many (20% are held back)")
    assert any(note.startswith("1 variant(s) reached the top-1 asked for as measured, but the held-back samples do "
                               "not prove it") for note in report["accuracy_notes"])


@pytest.mark.parametrize(("samples", "rows", "min_top1"), [(40, 1, 0.7), (20, 80, 0.93)])
def test_with_enough_rows_or_a_lower_min_top1_the_int8_classifier_may_be_served(
        tmp_path: Path, samples: int, rows: int, min_top1: float) -> None:
    """8 rows prove 74.7% (0.7 asked); 4 held-back samples of 80 rows prove 98.1% at 318 of 320
    with VNNI, 94.5% at 309 of 320 on an AVX2 CPU whose U8S8 products saturate (0.93 asked). Served
    then depends on its speed alone (timed, not asserted here)."""
    report = optimize(models.mlp().SerializeToString(), out_dir=tmp_path, calibration=_npz(samples, rows),
                      config=OptimizeConfig(min_top1=min_top1, **FAST)).report
    int8 = _int8(report)
    assert int8["accuracy"]["passed"] is True and not int8["accuracy"]["unproven"]
    assert int8["status"] == "ok" or int8["reason"].startswith("slower than the baseline"), int8["reason"]
    assert int8["accuracy"]["outputs"]["logits"]["top1_lower_95"] >= min_top1


def test_the_selection_note_counts_every_variant_judged_on_the_held_back_samples() -> None:
    """Failing checks count too: each is a chance for one variant to pass on these samples by luck."""
    ref = _logits(300)
    accuracy = compare(ref, _copy(ref), Tolerance(min_top1=0.9)).to_dict()
    notes = accuracy_notes(accuracy, 300, judged=(25, 3))
    assert notes == [
        "this variant was chosen among 25 variants judged on these same 300 held-back sample(s) (3 passed), and by "
        "them: its accuracy figures were also the selection criterion, so they are optimistic (selection bias); "
        "samples it has not seen measure it fairly"]
    assert accuracy_notes(accuracy, 300, judged=(1, 1)) == []


# --- the served speed-up comes from a second timing that chose nothing (winner's curse) ---------------------


def _stats(round_ms: list[float]) -> LatencyStats:
    ms = sorted(round_ms)
    return LatencyStats(batch=1, runs=len(ms), session_create_ms=1.0, warmup_runs=0, p50_ms=ms[len(ms) // 2],
                        p90_ms=ms[-1], p99_ms=ms[-1], mean_ms=sum(ms) / len(ms), throughput_per_s=1.0, provider="cpu",
                        round_ms=list(round_ms))


def _timing(winner_ms: list[float]) -> Noise:
    """A timing of the original (1 ms a round), its A/A control (1 ms) and the winner: a Noise as `_benchmark` makes."""
    base = _stats([1.0] * len(winner_ms))
    return Noise(paired_ratio(base, _stats([1.0] * len(winner_ms))), base, 1,
                 ratios={"int8": paired_ratio(base, _stats(winner_ms))})


def test_a_winner_the_confirmation_timing_does_not_confirm_is_not_served() -> None:
    selection, row = _timing([0.5] * 30), VariantReport(name="int8", precision="int8")
    served, why = _confirmed(row, selection, _timing([0.99] * 30), "int8 is the fastest variant within tolerance")
    assert served == "original"
    assert why.startswith("int8 was the fastest variant within tolerance at 2.00x the original, but timed again "
                          "against it alone it measured 1.01x the original")
    assert why.endswith("serving the original model")
    assert row.notes[-1].startswith("chosen at 2.000x the original, but timed again against it alone 1.01x")
    served, why = _confirmed(row, selection, _timing([0.6] * 30), "int8 is the fastest variant within tolerance")
    assert served == "int8" and why.endswith("measured 1.67x the original [95%: 1.67-1.67, 30 rounds; A/A control "
                                             "1.000x [1.000-1.000]], the speed-up reported as served")


def test_the_report_keeps_the_selection_figure_and_serves_the_confirmed_one(tmp_path: Path) -> None:
    """Whatever the timing decides on this host: a served variant's speed-up is the confirmation's, the selection's
    figure is kept as such, and nothing is confirmed when the original is served on the first timing."""
    report = optimize(models.redundant().SerializeToString(), out_dir=tmp_path,
                      config=OptimizeConfig(precision="fp32", min_top1=0.7, benchmark_seconds=0.2,
                                            batch_sizes=(1,))).report
    confirmation = report["confirmation"]
    if report["selected"] != "original":
        assert confirmation["variant"] == report["selected"]
        assert report["speedup_paired"] == confirmation["speedup"] and report["speedup_selection"]["rounds"] >= 20
        assert report["noise"]["aa_control"] == confirmation["aa_control"]
    elif confirmation is not None:  # chosen by the first timing, not confirmed by the second
        assert "not confirmed" in _variant_notes(report, confirmation["variant"])
    else:
        assert report["speedup_selection"] is None and report["speedup_paired"] is None


def _variant_notes(report: dict, name: str) -> str:
    return " ".join(next(v for v in report["variants"] if v["name"] == name)["notes"])


def test_auto_builds_nothing_when_the_held_back_rows_cannot_prove_the_top1_asked(tmp_path: Path) -> None:
    """8 held-back rows all agreeing prove at most 74.7%: every variant for a 99% gate could only end unproven."""
    config = OptimizeConfig(**{**FAST, "precision": "auto", "int8_mode": None})
    report = optimize(models.mlp().SerializeToString(), out_dir=tmp_path, calibration=_npz(40, 1), config=config).report
    auto = report["auto"]
    assert [v["precision"] for v in report["variants"] if v["precision"] == "int8"] == []
    assert auto["skipped"][0]["name"] == "every INT8 and FP16 candidate"
    reason = auto["skipped"][0]["reason"]
    assert "8 held-back unit(s), even all agreeing, prove at most 74.7%" in reason
    assert "268 units all agreeing prove it: a calibration set of 1336 or more samples" in reason
    assert reason.endswith("or set min_top1 to 0.747 or lower")


def test_auto_searches_when_the_held_back_rows_can_prove_the_top1_asked(tmp_path: Path) -> None:
    config = OptimizeConfig(**{**FAST, "precision": "auto", "int8_mode": None, "min_top1": 0.7})
    report = optimize(models.mlp().SerializeToString(), out_dir=tmp_path, calibration=_npz(40, 1), config=config).report
    assert any(v["precision"] == "int8" for v in report["variants"])
    assert all(s["name"] != "every INT8 and FP16 candidate" for s in report["auto"]["skipped"])


def test_a_variant_equal_up_to_float_rounding_needs_no_proof_of_its_top1() -> None:
    """A fused FP32 graph computes the original's function: 8 rows prove it as well as 800 (nothing to prove)."""
    reference = _logits(8)
    rounded = [{"logits": (v["logits"].astype(np.float64) * (1 + 1e-7)).astype(np.float32)} for v in reference]
    judged = compare(reference, rounded, Tolerance()).outputs["logits"]
    assert judged.passed and not judged.unproven and judged.top1_lower_95 < 0.99
    scaled = [{"logits": v["logits"] * 1.01} for v in reference]  # same argmax, but not float rounding: unproven
    assert compare(reference, scaled, Tolerance()).outputs["logits"].unproven

"""The whole optimizer: every variant built in isolation, judged and timed; the served one is never worse."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from optimizer import CalibrationError, OptimizerError
from optimizer.pipeline import BASELINE, OptimizeConfig, optimize
from optimizer.report_table import summary
from optimizer.runtime import create_session
from tests import models

FAST = {"benchmark_seconds": 0.2, "batch_sizes": (1,)}
REQUIRED_KEYS = {"source", "provider", "graph", "variants", "baseline", "selected", "speedup_p50", "size_ratio",
                 "calibration", "accuracy_notes"}


def _npz(model: onnx.ModelProto, samples: int = 24, seed: int = 0) -> bytes:
    """A calibration set in the `ndim == rank + 1` layout: one batch-1 feed per sample."""
    feeds = [models.random_feed(model, batch=1, seed=seed + i) for i in range(samples)]
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})
    return buffer.getvalue()


def _variant(report: dict, name: str) -> dict:
    return next(v for v in report["variants"] if v["name"] == name)


def _assert_served_is_never_worse(report: dict) -> None:
    base = _variant(report, BASELINE)
    chosen = _variant(report, report["selected"])
    if report["selected"] != BASELINE:
        assert chosen["status"] == "ok"
        assert chosen["accuracy"]["passed"] is True
        # Faster is judged round by round (paired), not by two p50s: under load those land in either mode on a few
        # runs' luck (optimizer/latency.py), and a full run saw a served fused graph at p50 0.0085 vs 0.0081 ms.
        assert report["speedup_p50"] == round(base["latency_ms"]["p50"] / chosen["latency_ms"]["p50"], 3)
        # served only on a speed-up proven against this run's A/A noise (required_speedup > 1)
        assert report["noise"]["required_speedup"] > 1.0
        assert report["speedup_paired"]["low"] >= report["noise"]["required_speedup"]
        assert report["speedup_paired"]["median"] >= report["noise"]["required_median"]
    else:
        assert report["speedup_paired"] is None
    for v in report["variants"]:
        if v["status"] == "rejected":
            assert v["reason"]
            assert v["name"] != report["selected"]


def test_fp32_report_has_every_field_and_serves_a_model_that_agrees(tmp_path: Path) -> None:
    model = models.redundant()
    # 8 generated rows all agreeing prove a top-1 of 74.7%: asked 99%, the fused model would be unproven
    config = OptimizeConfig(precision="fp32", min_top1=0.7, **FAST)
    result = optimize(model.SerializeToString(), out_dir=tmp_path, config=config)
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= REQUIRED_KEYS
    # every limit the guard applied, for readers of the report (the dashboard shows them)
    assert {k: report["tolerance"][k] for k in ("min_top1", "min_slice_cosine", "max_slice_error", "float_rounding")} \
        == {"min_top1": 0.7, "min_slice_cosine": 0.98, "max_slice_error": 0.25, "float_rounding": 1e-4}
    assert [v["name"] for v in report["variants"]] == ["original", "fused"]
    assert report["graph"]["before"]["node_count"] == len(model.graph.node)
    # the original's size is the file given (and downloaded), not the copy with inferred shapes: size_ratio uses it
    assert _variant(report, "original")["size_bytes"] == report["source"]["size_bytes"] == model.ByteSize()
    fused = _variant(report, "fused")
    assert fused["node_count"] < len(model.graph.node)
    assert fused["accuracy"]["passed"] is True
    for v in report["variants"]:
        assert set(v["latency_ms"]) == {"p50", "p90", "p99", "mean"}
        assert v["throughput_per_s"] > 0
    assert report["calibration"]["synthetic"] is True
    _assert_served_is_never_worse(report)
    # a cosine on 8 generated samples says little: the report and the printed summary say so
    assert [note.split(";")[0] for note in report["accuracy_notes"]] == [
        "output 'logits': cosine 1.0000 was measured on 8 held-back sample(s)"]
    assert "note: output 'logits': cosine 1.0000 was measured on 8 held-back sample(s)" in summary(report)

    feed = models.random_feed(model, batch=3)
    served = create_session(result.model_path).run(None, feed)[0]
    expected = create_session(model.SerializeToString()).run(None, feed)[0]
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)


def test_static_int8_with_calibration_quantizes_and_reports_samples(tmp_path: Path) -> None:
    model = models.cnn()
    config = OptimizeConfig(precision="int8", int8_mode="static", **FAST)
    result = optimize(model.SerializeToString(), out_dir=tmp_path, config=config, calibration=_npz(model))
    report = result.report
    int8 = next(v for v in report["variants"] if v["precision"] == "int8")
    assert int8["status"] in ("ok", "rejected"), int8["reason"]
    assert int8["changes"]["quantized_ops"].get("QuantizeLinear", 0) > 0
    assert int8["accuracy"]["outputs"]["logits"]["cosine"] > 0.98
    assert report["calibration"]["synthetic"] is False
    assert report["calibration"]["samples"] + report["calibration"]["holdout_samples"] == 24
    assert report["calibration"]["holdout_samples"] >= 4
    _assert_served_is_never_worse(report)


def test_static_int8_without_calibration_is_refused(tmp_path: Path) -> None:
    config = OptimizeConfig(precision="int8", int8_mode="static", **FAST)
    with pytest.raises(CalibrationError, match="needs a calibration set"):
        optimize(models.cnn().SerializeToString(), out_dir=tmp_path, config=config)


def test_int8_without_calibration_falls_back_to_dynamic(tmp_path: Path) -> None:
    report = optimize(models.mlp().SerializeToString(), out_dir=tmp_path,
                      config=OptimizeConfig(precision="int8", **FAST)).report
    int8 = next(v for v in report["variants"] if v["precision"] == "int8")
    assert int8["settings"]["mode"] == "dynamic"
    assert int8["changes"]["quantized_ops"]["MatMulInteger"] == 3
    _assert_served_is_never_worse(report)


def test_a_tool_failure_is_a_failed_variant_not_a_crash(tmp_path: Path) -> None:
    report = optimize(models.elementwise().SerializeToString(), out_dir=tmp_path,
                      config=OptimizeConfig(precision="int8", int8_mode="dynamic", **FAST)).report
    int8 = next(v for v in report["variants"] if v["precision"] == "int8")
    assert int8["status"] == "failed"
    assert "quantized no op" in int8["reason"]
    assert int8["latency_ms"] is None
    assert report["selected"] in (BASELINE, "fused")


def test_fp16_keeps_float32_io_and_is_judged(tmp_path: Path) -> None:
    result = optimize(models.mlp().SerializeToString(), out_dir=tmp_path,
                      config=OptimizeConfig(precision="fp16", **FAST))
    fp16 = _variant(result.report, "fp16")
    assert fp16["status"] in ("ok", "rejected")
    assert fp16["accuracy"]["outputs"]["logits"]["cosine"] > 0.999
    _assert_served_is_never_worse(result.report)
    served = onnx.load(result.model_path)
    assert served.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_auto_on_a_transformer_tries_dynamic_int8(tmp_path: Path) -> None:
    # fp16_on_cpu pinned: on a CPU with avx512_fp16 (Sapphire Rapids) auto tries FP16 instead of skipping it
    report = optimize(models.transformer().SerializeToString(), out_dir=tmp_path,
                      config=OptimizeConfig(fp16_on_cpu=False, **FAST)).report
    names = [v["name"] for v in report["variants"]]
    assert any(n.startswith("int8-dynamic") for n in names)
    assert {s["name"] for s in report["skipped_candidates"]} >= {"int8-static", "fp16"}
    _assert_served_is_never_worse(report)


def test_time_budget_skips_what_does_not_fit(tmp_path: Path) -> None:
    report = optimize(models.mlp().SerializeToString(), out_dir=tmp_path,
                      config=OptimizeConfig(time_budget_s=0.001, **FAST)).report
    skipped = [v for v in report["variants"] if v["status"] == "skipped"]
    assert skipped and all("time budget" in v["reason"] for v in skipped)
    assert report["selected"] == BASELINE


@pytest.mark.parametrize(("field", "value"), [("precision", "int4"), ("int8_mode", "weird"),
                                              ("calibration_method", "magic")])
def test_bad_config_is_refused_with_the_allowed_values(tmp_path: Path, field: str, value: str) -> None:
    with pytest.raises(OptimizerError, match="must be one of"):
        optimize(models.mlp().SerializeToString(), out_dir=tmp_path, config=OptimizeConfig(**{field: value}))

"""Activation equalization (optimizer/passes/equalize.py): same FP32 function, smaller INT8 error on an outlier channel.

Real ONNX Runtime sessions and quantize_static on small built models; assertions on numbers.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from optimizer.accuracy import Tolerance
from optimizer.auto import AutoSearch
from optimizer.calibration import SampleSet
from optimizer.candidates import auto_plan, u8s8_saturates
from optimizer.errors import PassError
from optimizer.passes import equalize, int8_static
from optimizer.pipeline import OptimizeConfig, optimize
from optimizer.runtime import SessionSettings, create_session
from optimizer.variants import VariantReport
from tests import models

HEAVY = ("Conv", "MatMul", "Gemm")


def _feeds(model: onnx.ModelProto, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return [models.random_feed(model, batch=1, seed=seed + i) for i in range(count)]


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = create_session(model.SerializeToString(), SessionSettings())
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))


def test_an_outlier_channel_is_equalized_without_changing_fp32_and_int8_error_shrinks() -> None:
    # Conv-Relu-Conv-Relu-Conv whose first block's channel 0 is 300x the others (the next Conv divides it back)
    model = models.detector(seed=3, channels=(16, 16), image=16, box_scale=1.0, hidden_outlier=300.0)
    calibration, holdout = _feeds(model, 16), _feeds(model, 6, seed=100)

    result = equalize.run(model, equalize.EqualizeConfig(), calibration, holdout[0])

    assert result.changes["equalized"] >= 1
    assert result.changes["worst_spread_before"] > 50
    reference = _run(model, holdout)
    assert np.abs(_run(result.model, holdout) - reference).max() <= 1e-4 * np.abs(reference).max()
    config = int8_static.Int8StaticConfig(quant_format="qdq", activation_type="uint8", op_types=HEAVY)
    plain = int8_static.run(model, config, calibration, holdout[0]).model
    equalized = int8_static.run(result.model, config, calibration, holdout[0]).model
    error_plain = _relative_error(reference, _run(plain, holdout))
    error_equalized = _relative_error(reference, _run(equalized, holdout))
    assert error_plain > 0.05  # the outlier channel leaves the others a few levels of one activation scale
    assert error_equalized < error_plain / 3


def _conv_act_conv(activation: str) -> onnx.ModelProto:
    """Conv -> `activation` -> Conv, channel 0 of the middle tensor 300x the others."""
    b = models.GraphBuilder(5)
    w1 = b.rng.normal(0, 0.3, size=(8, 4, 3, 3)).astype(np.float32)
    w1[0] *= 300
    x = b.op("Conv", ["image", b.const(w1), b.weight(8, scale=0.1)], pads=[1, 1, 1, 1])
    x = b.op(activation, [x])
    x = b.op("Conv", [x, b.weight(4, 8, 1, 1)])
    b.rename_output(x, "out")
    return b.model([helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                   [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, 8, 8])], "conv_act_conv")


@pytest.mark.parametrize("activation", ["Sigmoid", "HardSigmoid", "HardSwish"])
def test_a_conv_pair_around_a_non_homogeneous_activation_is_left_alone(activation: str) -> None:
    model = _conv_act_conv(activation)
    assert equalize.find_sites(model) == []
    feeds = _feeds(model, 4)
    with pytest.raises(PassError, match="no Conv input qualifies"):
        equalize.run(model, equalize.EqualizeConfig(), feeds, feeds[0])


def test_the_scale_goes_through_relu_into_the_producing_conv() -> None:
    model = _conv_act_conv("Relu")
    (site,) = equalize.find_sites(model)
    assert [e.kind for e in site.edits] == ["conv_out"]
    feeds = _feeds(model, 8)
    result = equalize.run(model, equalize.EqualizeConfig(alpha=1.0), feeds, feeds[0])
    # alpha=1 makes every channel's range equal: the 300x channel now spans what the others span
    ranges = equalize.channel_ranges(result.model, [site.tensor], feeds)[site.tensor]
    assert ranges.max() / np.median(ranges) < 1.5
    assert np.abs(_run(result.model, feeds) - _run(model, feeds)).max() <= 1e-4 * np.abs(_run(model, feeds)).max()


def test_a_conv_output_read_by_sigmoid_is_equalized_behind_a_div_when_asked() -> None:
    model = _conv_act_conv("Sigmoid")
    calibration, holdout = _feeds(model, 16), _feeds(model, 6, seed=100)

    result = equalize.run(model, equalize.EqualizeConfig(output_spread=4.0), calibration, holdout[0])

    assert result.changes["outputs_equalized"] == 1
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Div", "Sigmoid", "Conv"]
    reference = _run(model, holdout)
    assert np.abs(_run(result.model, holdout) - reference).max() <= 1e-4 * np.abs(reference).max()
    # 7-bit weights where U8S8 products saturate (x86 without VNNI): else saturation, not the outlier, dominates
    config = int8_static.Int8StaticConfig(quant_format="qdq", activation_type="uint8", op_types=HEAVY,
                                          reduce_range=u8s8_saturates())
    plain = int8_static.run(model, config, calibration, holdout[0])
    equalized = int8_static.run(result.model, config, calibration, holdout[0])
    assert equalized.changes["tool_excluded_nodes"] == []  # the Conv is quantized, not left in float by a crash
    error_plain = _relative_error(reference, _run(plain.model, holdout))
    error_equalized = _relative_error(reference, _run(equalized.model, holdout))
    assert error_plain > 0.1
    assert error_equalized < error_plain / 5


def test_auto_plans_the_equalized_candidate_and_it_passes_where_its_plain_twin_fails(tmp_path: Path) -> None:
    model = models.detector(channels=(8, 16, 16), box_scale=1.0, hidden_outlier=300.0)
    plain, equalized = "int8-static-minmax-qdq-u8s8-heavy", "int8-static-minmax-qdq-u8s8-heavy-eq"
    plan = auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=False,
                     equalized=equalize.Equalized())
    names = [c.name for c in plan.candidates]
    assert names.index(equalized) == names.index(plain) + 1
    feeds = _feeds(model, 24)
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})
    config = OptimizeConfig(auto_candidates=(plain, equalized), auto_prune_by_latency=False, benchmark_seconds=0.2,
                            batch_sizes=(1,))
    report = optimize(model.SerializeToString(), out_dir=tmp_path, config=config, calibration=buffer.getvalue()).report

    rows = {c["name"]: c for c in report["auto"]["candidates"]}
    # (accuracy, not status: on a model this small INT8 may lose to FP32 on speed and be rejected for that)
    assert rows[plain]["accuracy"]["passed"] is False
    assert min(o["cosine"] for o in rows[plain]["accuracy"]["outputs"].values()) < 0.9
    assert rows[equalized]["accuracy"]["passed"] is True
    assert rows[equalized]["settings"]["equalize"]["alpha"] == 0.5
    worst = min(o["cosine"] for o in rows[equalized]["accuracy"]["outputs"].values())
    # Where U8S8 products saturate (x86 without VNNI; this plan has no 7-bit twin of the equalized recipe), the
    # equalized variant measured 0.9979 on an AVX2 EPYC: still inside the default gate (0.99), as `passed` says.
    assert worst > (0.995 if u8s8_saturates() else 0.999)


def _failing_row(name: str, cosine: float, equalized: bool) -> VariantReport:
    settings = {"mode": "static", "method": "minmax", "format": "qdq", "activation_type": "uint8",
                "op_types": list(HEAVY)}
    if equalized:
        settings["equalize"] = {"alpha": 0.5, "min_spread": 4.0, "output_spread": 2.0}
    accuracy = {"passed": False, "outputs": {"out": {"checked": True, "cosine": cosine,
                                                     "slices": {"worst_cosine": cosine, "worst_error": 0.1}}}}
    return VariantReport(name=name, precision="int8", settings=settings, status="rejected", accuracy=accuracy)


@pytest.mark.parametrize(("plain_cosine", "equalized_cosine", "kept"), [(0.92, 0.985, "eq"), (0.95, 0.90, "plain")])
def test_of_a_recipe_and_its_equalized_twin_only_the_one_closer_to_passing_is_repaired(
        plain_cosine: float, equalized_cosine: float, kept: str) -> None:
    model = models.detector()
    feeds = _feeds(model, 4)
    search = AutoSearch(source=model, samples=SampleSet(feeds[:2], feeds[2:], False, "test"),
                        settings=SessionSettings(), tolerance=Tolerance(), reference=[], provider="cpu",
                        deadline=0.0, built={}, fp32_name="fused", prune_by_latency=False)
    plain = _failing_row("int8-static-minmax-qdq-u8s8-heavy", plain_cosine, equalized=False)
    twin = _failing_row("int8-static-minmax-qdq-u8s8-heavy-eq", equalized_cosine, equalized=True)
    other = _failing_row("int8-static-minmax-qdq-u8s8-all", 0.5, equalized=False)
    other.settings["op_types"] = "all"

    plain.probe_latency_ms, twin.probe_latency_ms = {"p50": 10.0}, {"p50": 14.0}

    left, slot = search._closer_of_equalized_twins([plain, twin, other])

    assert [r.name for r in left] == [twin.name if kept == "eq" else plain.name, other.name]
    assert slot == {(twin if kept == "eq" else plain).name: 10.0}  # the plain recipe's place in the order
    dropped = plain if kept == "eq" else twin
    assert search.skipped[0]["name"] == f"{dropped.name} (repair)"

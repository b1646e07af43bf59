"""Activation smoothing (optimizer/passes/smooth.py): FP32 outputs unchanged, dynamic INT8 error smaller."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.calibration import SampleSet
from optimizer.candidates import auto_plan, dynamic_candidate, smooth_config
from optimizer.errors import PassError
from optimizer.passes import int8_dynamic, smooth
from optimizer.runtime import create_session

FEATURES, OUT, OUTLIER = 64, 48, 5


def _model(producer: str, residual: bool = False) -> onnx.ModelProto:
    """x[n, 64] -> producer -> MatMul(W[64, 48]) -> y, where the producer's output has one channel ~40x the others.

    producer: "layernorm" (gamma of that channel 40), "relu" (the input's channel is large; Relu absorbs nothing).
    residual: the LayerNorm output is also added to the MatMul's output, so gamma must not change.
    """
    rng = np.random.default_rng(0)
    out = FEATURES if residual else OUT
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (FEATURES, out)).astype(np.float32), "W")]
    if producer == "layernorm":
        gamma = rng.uniform(0.5, 1.5, FEATURES).astype(np.float32)
        gamma[OUTLIER] = 40.0
        inits += [numpy_helper.from_array(gamma, "gamma"),
                  numpy_helper.from_array(rng.normal(0, 0.1, FEATURES).astype(np.float32), "beta")]
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln")]
    else:
        nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu")]
    if residual:
        nodes += [helper.make_node("MatMul", ["h", "W"], ["m"], name="mm"),
                  helper.make_node("Add", ["m", "h"], ["y"], name="residual")]
    else:
        nodes.append(helper.make_node("MatMul", ["h", "W"], ["y"], name="mm"))
    graph = helper.make_graph(nodes, "smooth", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(producer: str, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.normal(0, 1, (16, FEATURES)).astype(np.float32)
        if producer == "relu":
            x = np.abs(x)
            x[:, OUTLIER] *= 40.0
        feeds.append({"x": x})
    return feeds


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = create_session(model.SerializeToString())
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _int8_error(model: onnx.ModelProto, reference: np.ndarray, feeds: list[dict[str, np.ndarray]]) -> float:
    """Relative RMS error of the dynamic S8 per-channel model against the FP32 reference."""
    config = int8_dynamic.Int8DynamicConfig(weight_type="int8", per_channel=True)
    quantized = int8_dynamic.run(model, config, feeds[0]).model
    return float(np.sqrt(np.mean((_run(quantized, feeds) - reference) ** 2) / np.mean(reference ** 2)))


def test_layernorm_absorbs_the_division_fp32_unchanged_and_int8_error_smaller() -> None:
    model, calibration, held = _model("layernorm"), _feeds("layernorm", 8, 0), _feeds("layernorm", 4, 1)
    result = smooth.run(model, smooth.SmoothConfig(alpha=0.5), calibration, held[0])
    assert result.changes["smoothed"] == {"LayerNormalization": 1}
    assert [n.op_type for n in result.model.graph.node] == ["LayerNormalization", "MatMul"]  # nothing inserted
    reference = _run(model, held)
    np.testing.assert_allclose(_run(result.model, held), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    gamma = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "gamma"))
    assert gamma[OUTLIER] / np.median(gamma) < 10  # the outlier channel was 40 / ~1 before
    plain, smoothed = _int8_error(model, reference, held), _int8_error(result.model, reference, held)
    assert smoothed < 0.5 * plain, (plain, smoothed)


def test_producer_that_cannot_absorb_gets_a_mul_only_when_asked() -> None:
    model, calibration, held = _model("relu"), _feeds("relu", 8, 0), _feeds("relu", 4, 1)
    with pytest.raises(PassError, match="reads a LayerNormalization's output"):
        smooth.run(model, smooth.SmoothConfig(insert_mul=True), calibration, held[0])  # the default scope
    with pytest.raises(PassError, match="no producer can absorb"):
        smooth.run(model, smooth.SmoothConfig(scope="all"), calibration, held[0])
    result = smooth.run(model, smooth.SmoothConfig(scope="all", insert_mul=True), calibration, held[0])
    assert result.changes["smoothed"] == {"inserted Mul": 1}
    assert [n.op_type for n in result.model.graph.node] == ["Relu", "Mul", "MatMul"]
    reference = _run(model, held)
    np.testing.assert_allclose(_run(result.model, held), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    plain, smoothed = _int8_error(model, reference, held), _int8_error(result.model, reference, held)
    assert smoothed < 0.5 * plain, (plain, smoothed)


def test_layernorm_output_read_by_a_residual_is_not_folded() -> None:
    model, calibration, held = _model("layernorm", residual=True), _feeds("layernorm", 8, 0), _feeds("layernorm", 4, 1)
    result = smooth.run(model, smooth.SmoothConfig(insert_mul=True), calibration, held[0])
    assert result.changes["smoothed"] == {"inserted Mul": 1}
    gammas = [numpy_helper.to_array(t) for t in result.model.graph.initializer if t.name == "gamma"]
    np.testing.assert_array_equal(gammas[0], numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "gamma")))
    reference = _run(model, held)
    np.testing.assert_allclose(_run(result.model, held), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_auto_plans_a_smoothed_dynamic_candidate_for_matmul_models_with_samples() -> None:
    with_samples = auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=False,
                             matmul_heavy=True)
    names = [c.name for c in with_samples.candidates]
    assert "int8-dynamic-s8-pc-sq" in names
    assert names.index("int8-dynamic-s8-pc-sq") < names.index("int8-static-minmax-qoperator-u8s8-all")
    without = auto_plan(provider="cpu", method="minmax", has_calibration=False, fp16_on_cpu=False, matmul_heavy=True)
    assert "int8-dynamic-s8-pc-sq" not in [c.name for c in without.candidates]  # nothing to measure channels on
    cnn = auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=False)
    assert "int8-dynamic-s8-pc-sq" not in [c.name for c in cnn.candidates]


def test_smoothed_candidate_quantizes_the_smoothed_source_and_repairs_keep_it() -> None:
    model, calibration, held = _model("layernorm"), _feeds("layernorm", 8, 0), _feeds("layernorm", 4, 1)
    samples = SampleSet(calibration=calibration, holdout=held, synthetic=False, source="test")
    cache = smooth.Smoothed()
    candidate = dynamic_candidate(smooth_alpha=0.5, smoothed=cache)
    result = candidate.build(model, samples)
    assert candidate.settings["smooth"] == {"alpha": 0.5, "scope": "norm"}
    assert result.changes["smooth"]["smoothed"] == {"LayerNormalization": 1}
    reference = _run(model, held)
    smoothed_error = float(np.sqrt(np.mean((_run(result.model, held) - reference) ** 2) / np.mean(reference ** 2)))
    assert smoothed_error < 0.5 * _int8_error(model, reference, held), smoothed_error
    repair = dynamic_candidate(exclude=("ln",), suffix="repair-top1", smooth_alpha=0.5, smoothed=cache)
    assert repair.name == "int8-dynamic-s8-pc-sq-repair-top1"
    assert cache.get(model, smooth_config(0.5), calibration, held[0]) is cache.get(model, smooth_config(0.5), [], {})


@pytest.mark.parametrize(("first", "folded"),
                         [("gemm", "Gemm"), ("gemm_trans_b", "Gemm"), ("matmul_add", "MatMul+Add")])
def test_a_preceding_linear_layer_absorbs_the_division_in_its_output_columns(first: str, folded: str) -> None:
    """x -> Gemm / MatMul+Add (output channel 5 large) -> MatMul: the first layer's columns and bias take 1/s."""
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 0.2, (FEATURES, FEATURES)).astype(np.float32)
    w1[:, OUTLIER] *= 40.0
    bias = rng.normal(0, 0.1, FEATURES).astype(np.float32)
    inits = [numpy_helper.from_array(w1.T.copy() if first == "gemm_trans_b" else w1, "W1"),
             numpy_helper.from_array(bias, "b1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (FEATURES, OUT)).astype(np.float32), "W2")]
    if first == "matmul_add":
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["p"], name="mm1"),
                 helper.make_node("Add", ["p", "b1"], ["h"], name="add1")]
    else:
        nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="gemm1", transB=int(first == "gemm_trans_b"))]
    nodes.append(helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, FEATURES])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    calibration, held = _feeds("layernorm", 8, 0), _feeds("layernorm", 4, 1)
    result = smooth.run(model, smooth.SmoothConfig(scope="all"), calibration, held[0])
    assert result.changes["smoothed"] == {folded: 1}
    assert len(result.model.graph.node) == len(nodes)
    reference = _run(model, held)
    np.testing.assert_allclose(_run(result.model, held), reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())

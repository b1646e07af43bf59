"""FP16, dynamic INT8 and static INT8 passes on the shared test models, with real ONNX Runtime.

Accuracy is measured on samples the static pass did not calibrate on.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from optimizer.calibration import synthetic_samples
from optimizer.errors import CalibrationError, PassError
from optimizer.passes import fp16, int8_dynamic, int8_static
from optimizer.passes.int8_dynamic import count_quantized_ops
from optimizer.runtime import SessionSettings, create_session
from tests import models

BUILDERS = {"cnn": models.cnn, "mlp": models.mlp, "transformer": models.transformer, "lstm": models.lstm}


def split_samples(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """8 samples to calibrate on, 4 others to compare outputs on."""
    feeds = synthetic_samples(model, count=12, seed=1).holdout
    return feeds[:8], feeds[8:]


def outputs(model: onnx.ModelProto, feeds: list[dict]) -> np.ndarray:
    session = create_session(model.SerializeToString(), SessionSettings(intra_op_threads=1))
    return np.concatenate([session.run(None, feed)[0].ravel() for feed in feeds])


def cosine(model: onnx.ModelProto, variant: onnx.ModelProto, feeds: list[dict]) -> float:
    a, b = outputs(model, feeds).astype(np.float64), outputs(variant, feeds).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def io_types(model: onnx.ModelProto) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


def producers(model: onnx.ModelProto) -> dict[str, str]:
    return {out: node.op_type for node in model.graph.node for out in node.output}


@pytest.fixture(scope="module")
def cnn_minmax():
    model = models.cnn()
    calibration, holdout = split_samples(model)
    return model, holdout, int8_static.run(model, int8_static.Int8StaticConfig(), calibration, holdout[0])


# --- FP16 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
def test_fp16_keeps_float32_io_and_stays_close(name):
    model = BUILDERS[name]()
    _, holdout = split_samples(model)
    result = fp16.run(model, fp16.Fp16Config(), holdout[0])
    assert io_types(result.model) == io_types(model)
    assert result.changes["float16_initializers"] > 0
    assert any(t.data_type == TensorProto.FLOAT16 for t in result.model.graph.initializer)
    assert result.changes["casts_added"] >= 2  # at least one Cast in, one Cast out
    assert cosine(model, result.model, holdout) > 0.999
    assert not np.array_equal(outputs(model, holdout), outputs(result.model, holdout))  # it really computes in FP16


def test_fp16_block_list_keeps_blocked_ops_in_float32():
    model = models.transformer()  # its unfused LayerNorm squares activations with Pow
    result = fp16.run(model, fp16.Fp16Config(), split_samples(model)[1][0])
    assert {"Resize", "Range", "TopK", "NonMaxSuppression", "Pow"} <= set(fp16.DEFAULT_BLOCK_LIST)
    initializers = {t.name: t for t in result.model.graph.initializer}
    pow_nodes = [n for n in result.model.graph.node if n.op_type == "Pow"]
    assert len(pow_nodes) == result.changes["blocked_nodes"] == 2
    assert all(initializers[n.input[1]].data_type == TensorProto.FLOAT for n in pow_nodes)
    assert any("Pow" in note for note in result.notes)


def test_fp16_without_io_types_changes_the_interface():
    model = models.mlp()
    result = fp16.run(model, fp16.Fp16Config(keep_io_types=False),
                      {"features": np.zeros((1, 64), np.float16)})
    assert set(io_types(result.model).values()) == {TensorProto.FLOAT16}


# --- INT8 dynamic -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("mlp", {"MatMulInteger": 3, "DynamicQuantizeLinear": 3}),
    ("transformer", {"MatMulInteger": 6, "DynamicQuantizeLinear": 4}),
    ("lstm", {"DynamicQuantizeLSTM": 1, "MatMulInteger": 1, "DynamicQuantizeLinear": 1}),
])
def test_int8_dynamic_quantizes_and_stays_close(name, expected):
    model = BUILDERS[name]()
    _, holdout = split_samples(model)
    result = int8_dynamic.run(model, int8_dynamic.Int8DynamicConfig(), holdout[0])
    assert result.changes["quantized_ops"] == expected
    assert count_quantized_ops(result.model) == expected
    assert cosine(model, result.model, holdout) > 0.98
    assert any("quant_pre_process" in note for note in result.notes)


def test_int8_dynamic_options_are_applied():
    model = models.mlp()
    _, holdout = split_samples(model)
    first_matmul = next(n.name for n in model.graph.node if n.op_type == "MatMul")
    result = int8_dynamic.run(model, int8_dynamic.Int8DynamicConfig(
        weight_type="uint8", per_channel=True, nodes_to_exclude=(first_matmul,)), holdout[0])
    assert result.changes["quantized_ops"]["MatMulInteger"] == 2
    assert result.changes["op_histogram_after"]["MatMul"] == 1
    weights = [t for t in result.model.graph.initializer if t.name.endswith("_quantized")]
    assert weights and all(t.data_type == TensorProto.UINT8 for t in weights)
    assert cosine(model, result.model, holdout) > 0.98


def test_int8_dynamic_reports_exclusions_that_match_nothing():
    model = models.mlp()
    config = int8_dynamic.Int8DynamicConfig(nodes_to_exclude=("NoSuchNode",))
    result = int8_dynamic.run(model, config, split_samples(model)[1][0])
    assert result.changes["quantized_ops"]["MatMulInteger"] == 3
    assert any("['NoSuchNode'] match no node" in note for note in result.notes)


# --- INT8 static --------------------------------------------------------------------------------


def assert_qdq_around(model: onnx.ModelProto, op_types: set[str]) -> int:
    """Every node of `op_types` reads its data and weight from DequantizeLinear; returns how many."""
    made_by = producers(model)
    nodes = [n for n in model.graph.node if n.op_type in op_types]
    for node in nodes:
        assert made_by.get(node.input[0]) == "DequantizeLinear", node.name
        assert made_by.get(node.input[1]) == "DequantizeLinear", node.name
    return len(nodes)


def test_int8_static_minmax_qdq_on_cnn(cnn_minmax):
    model, holdout, result = cnn_minmax
    counts = result.changes["quantized_ops"]
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    assert assert_qdq_around(result.model, {"Conv", "Gemm"}) == 3  # 2 Conv (BN folded in) and the Gemm
    assert cosine(model, result.model, holdout) > 0.98
    assert result.changes["calibration_samples"] == 8 and result.changes["calibration_chunk"] == 8


def test_int8_static_minmax_qdq_on_mlp():
    model = models.mlp()
    calibration, holdout = split_samples(model)
    result = int8_static.run(model, int8_static.Int8StaticConfig(), calibration, holdout[0])
    assert assert_qdq_around(result.model, {"MatMul", "Gemm"}) == 3
    assert cosine(model, result.model, holdout) > 0.98


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_int8_static_histogram_methods_on_cnn(method, cnn_minmax):
    model, holdout, minmax = cnn_minmax
    calibration, _ = split_samples(model)
    result = int8_static.run(model, int8_static.Int8StaticConfig(method=method), calibration, holdout[0])
    assert result.changes["method"] == method
    assert assert_qdq_around(result.model, {"Conv", "Gemm"}) == 3
    assert cosine(model, result.model, holdout) > 0.98
    # Each method computes its own ranges (ORT's quantize_static defaults made Entropy equal MinMax).
    assert scales(result.model) != scales(minmax.model)


def scales(model: onnx.ModelProto) -> dict[str, float]:
    return {t.name: float(numpy_helper.to_array(t).ravel()[0]) for t in model.graph.initializer
            if t.name.endswith("_scale") and t.data_type == TensorProto.FLOAT}


def test_int8_static_excluded_node_stays_float():
    model = models.cnn()
    calibration, holdout = split_samples(model)
    last_conv = [n.name for n in model.graph.node if n.op_type == "Conv"][-1]
    config = int8_static.Int8StaticConfig(nodes_to_exclude=(last_conv,))
    result = int8_static.run(model, config, calibration, holdout[0])
    made_by = producers(result.model)
    convs = {n.name: made_by.get(n.input[1]) for n in result.model.graph.node if n.op_type == "Conv"}
    assert sorted(convs.values(), key=str) == ["DequantizeLinear", None]  # its weight is a float initializer
    assert convs[last_conv] is None
    assert cosine(model, result.model, holdout) > 0.98


def test_int8_static_qoperator_gives_qlinearconv():
    model = models.cnn()
    calibration, holdout = split_samples(model)
    config = int8_static.Int8StaticConfig(quant_format="qoperator", activation_type="uint8")
    result = int8_static.run(model, config, calibration, holdout[0])
    assert result.changes["quantized_ops"]["QLinearConv"] == 2
    assert "Conv" not in result.changes["op_histogram_after"]
    assert cosine(model, result.model, holdout) > 0.98


def test_int8_static_per_channel_converts_old_opsets():
    """Per-channel QDQ on opset 11 writes an invalid model (DequantizeLinear axis); the pass converts first."""
    model = models.cnn()
    model.opset_import[0].version = 11  # every op of the cnn has the same meaning at opset 11
    onnx.checker.check_model(model, full_check=True)
    calibration, holdout = split_samples(model)
    result = int8_static.run(model, int8_static.Int8StaticConfig(per_channel=True), calibration, holdout[0])
    assert result.model.opset_import[0].version >= 13
    assert any("opset converted from 11 to 13" in note for note in result.notes)
    assert cosine(model, result.model, holdout) > 0.98


def test_int8_static_chunked_calibration_gives_the_same_ranges(cnn_minmax):
    model, holdout, whole = cnn_minmax
    calibration, _ = split_samples(model)
    per_sample = whole.changes["activation_bytes_per_sample"]
    config = int8_static.Int8StaticConfig(memory_budget_bytes=3 * per_sample)
    chunked = int8_static.run(model, config, calibration, holdout[0])
    assert chunked.changes["calibration_chunk"] == 3 and chunked.changes["calibration_samples"] == 8
    assert any("chunks of 3 samples" in note for note in chunked.notes)
    assert scales(chunked.model) == pytest.approx(scales(whole.model))


def test_activation_bytes_estimate_counts_every_float_tensor():
    model = models.mlp(features=64, hidden=128, classes=10)
    feed = {"features": np.zeros((1, 64), np.float32)}
    total, unknown = int8_static.activation_bytes_per_sample(model, feed)
    # input 64, then MatMul/Add/Relu twice at 128, then MatMul/Add at 10 (float32)
    assert (total, unknown) == ((64 + 6 * 128 + 2 * 10) * 4, 0)
    batch4, _ = int8_static.activation_bytes_per_sample(model, {"features": np.zeros((4, 64), np.float32)})
    assert batch4 == 4 * total


# --- Refusals ------------------------------------------------------------------------------------


def test_nothing_to_quantize_is_a_pass_error():
    model = models.elementwise()
    calibration, holdout = split_samples(model)
    with pytest.raises(PassError, match="int8 dynamic quantized no op: .*Abs, Sqrt, Tanh"):
        int8_dynamic.run(model, int8_dynamic.Int8DynamicConfig(), holdout[0])
    with pytest.raises(PassError, match="int8 static quantized no op"):
        int8_static.run(model, int8_static.Int8StaticConfig(), calibration, holdout[0])


def test_op_types_that_match_nothing_is_a_pass_error():
    model = models.mlp()
    with pytest.raises(PassError, match="quantized no op"):
        int8_dynamic.run(model, int8_dynamic.Int8DynamicConfig(op_types=("Conv",)), split_samples(model)[1][0])


def test_static_without_samples_is_refused():
    model = models.cnn()
    with pytest.raises(CalibrationError, match="needs calibration samples.*dynamic INT8"):
        int8_static.run(model, int8_static.Int8StaticConfig(), [], split_samples(model)[1][0])


def test_tool_exception_becomes_pass_error():
    model = models.cnn()
    _, holdout = split_samples(model)
    wrong = [{"image": np.zeros((1, 3, 16, 16), np.float32)}] * 2  # the calibrator's session refuses these
    with pytest.raises(PassError, match="int8 static: minmax calibration or quantize_static failed: ") as err:
        int8_static.run(model, int8_static.Int8StaticConfig(), wrong, holdout[0])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("config", "message"), [
    (int8_static.Int8StaticConfig(activation_type="int8", weight_type="uint8"), "no kernels"),
    (int8_static.Int8StaticConfig(extra_options={"CalibMaxIntermediateOutputs": 2}), "CalibMaxIntermediateOutputs"),
    (int8_static.Int8StaticConfig(method="kl"), "method must be one of"),
])
def test_invalid_static_configs_are_refused(config, message):
    model = models.mlp()
    calibration, holdout = split_samples(model)
    with pytest.raises(PassError, match=message):
        int8_static.run(model, config, calibration, holdout[0])

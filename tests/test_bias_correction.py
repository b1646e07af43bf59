"""Bias correction (optimizer/passes/bias_correction.py): the per-channel mean shift of INT8 is measured, removed.

Real quantize_static QDQ builds and ONNX Runtime sessions on small built CNNs; assertions on numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import PassError
from optimizer.passes import bias_correction, int8_static
from optimizer.runtime import SessionSettings, create_session
from tests import models

HEAVY = ("Conv", "MatMul", "Gemm")
U8_HEAVY = int8_static.Int8StaticConfig(quant_format="qdq", activation_type="uint8", op_types=HEAVY)


def _feeds(model: onnx.ModelProto, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return [models.random_feed(model, batch=1, seed=seed + i) for i in range(count)]


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = create_session(model.SerializeToString(), SessionSettings())
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def _channel_mean_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over channels of |mean over samples and positions of (reference - candidate)|."""
    return float(np.abs((reference - candidate).mean(axis=(0, 2, 3))).mean())


def _heavy_tailed(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Conv weights times a log-normal factor: a few large weights set each channel's INT8 scale and the
    many small ones round coarsely, so the rounding no longer averages out per channel."""
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim == 4:
            array = array * np.exp(rng.normal(0, 1.0, array.shape))
            init.CopyFrom(numpy_helper.from_array(array.astype(np.float32), init.name))
    return model


@pytest.mark.parametrize("mode", ["local", "sequential"])
def test_the_mean_error_per_channel_drops_on_held_out_samples_and_the_float_model_is_untouched(mode: str) -> None:
    model = _heavy_tailed(models.detector(seed=1, channels=(16, 16), image=16, box_scale=1.0), seed=1)
    calibration, holdout = _feeds(model, 16), _feeds(model, 6, seed=100)
    quantized = int8_static.run(model, U8_HEAVY, calibration, calibration[0]).model
    model_bytes, quantized_bytes = model.SerializeToString(), quantized.SerializeToString()

    result = bias_correction.run(quantized, bias_correction.BiasCorrectionConfig(mode=mode), model, calibration,
                                 calibration[0])

    assert result.changes["corrected_nodes"] == 3 and result.changes["skipped_nodes"] == 0
    # local: the two Convs after the first quantize the float model's activations; sequential: 3 levels
    assert (result.changes["locally_fed_tensors"], result.changes["levels"]) == ((2, 1) if mode == "local" else (0, 3))
    reference = _run(model, holdout)
    before = _channel_mean_error(reference, _run(quantized, holdout))
    after = _channel_mean_error(reference, _run(result.model, holdout))
    assert before > 0.02
    assert after < before / 4  # measured: 0.047 -> 0.0074 (local), 0.0029 (sequential)
    assert model.SerializeToString() == model_bytes  # the float reference is not edited
    assert quantized.SerializeToString() == quantized_bytes  # nor the QDQ model given
    biases = [numpy_helper.to_array(i) for i in result.model.graph.initializer if i.name.endswith("_quantized")
              and numpy_helper.to_array(i).dtype == np.int32]
    assert biases and all(b.dtype == np.int32 for b in biases)  # ORT's int32 bias format is kept


def _conv_without_bias(seed: int = 0, channels: int = 8, image: int = 12) -> onnx.ModelProto:
    b = models.GraphBuilder(seed)
    w = b.rng.normal(0, 0.3, size=(channels, 3, 3, 3)) * np.exp(b.rng.normal(0, 1.0, size=(channels, 3, 3, 3)))
    x = b.op("Conv", ["image", b.const(w.astype(np.float32))], pads=[1, 1, 1, 1])
    x = b.op("Relu", [x])
    x = b.op("Conv", [x, b.const(b.rng.normal(0, 0.3, size=(channels, channels, 1, 1)).astype(np.float32))])
    b.rename_output(x, "features")
    return b.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", channels, image, image])],
        "conv_without_bias",
    )


def test_a_conv_without_bias_gets_an_int32_bias_that_onnx_runtime_still_fuses(tmp_path: Path) -> None:
    model = _conv_without_bias()
    calibration = _feeds(model, 12)
    quantized = int8_static.run(model, U8_HEAVY, calibration, calibration[0]).model
    assert all(len(n.input) == 2 for n in quantized.graph.node if n.op_type == "Conv")

    # sequential: the second Conv is measured after the first got its new bias (appended, then sorted)
    result = bias_correction.run(quantized, bias_correction.BiasCorrectionConfig(mode="sequential"), model,
                                 calibration, calibration[0])
    corrected = result.model
    assert (result.changes["corrected_nodes"], result.changes["levels"]) == (2, 2)

    convs = [n for n in corrected.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in corrected.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in corrected.graph.initializer}
    for conv in convs:
        dq = producers[conv.input[2]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int32
    optimized = tmp_path / "optimized.onnx"
    create_session(corrected.SerializeToString(), SessionSettings(), save_optimized_to=optimized)
    fused_ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    assert "QLinearConv" in fused_ops and "Conv" not in fused_ops


def test_a_reference_with_other_weights_is_refused() -> None:
    model = models.detector(seed=0, channels=(8,), image=8)
    calibration = _feeds(model, 4)
    quantized = int8_static.run(model, U8_HEAVY, calibration, calibration[0]).model
    other = models.detector(seed=0, channels=(8,), image=8)
    renamed = {i.name: f"other_{i.name}" for i in other.graph.initializer}
    for init in other.graph.initializer:
        init.name = renamed[init.name]
    for node in other.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    with pytest.raises(PassError, match="float twin"):
        bias_correction.run(quantized, bias_correction.BiasCorrectionConfig(), other, calibration, calibration[0])

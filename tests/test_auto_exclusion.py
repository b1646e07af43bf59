"""A node a repair leaves in float stays float where it runs: in ONNX Runtime's optimized graph, not only in the file.

ONNX Runtime's session-time optimizer used to quantize an excluded Conv again (WeightBiasQuantization gave it a
per-tensor INT8 weight, the QDQ fusion a QLinearConv) whenever its neighbours were quantized: every all-op repair
of a Conv was a no-op. Real quantization, real sessions; the graph ONNX Runtime optimized is read back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from optimizer.passes import cleanup, int8_static
from optimizer.runtime import SessionSettings, create_session
from tests import models


def _fused() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    model = models.cnn(channels=(8, 16, 16))
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(8)]
    return cleanup.run(model, cleanup.CleanupConfig(provider="cpu"), feed=feeds[0]).model, feeds


def _as_run(model: onnx.ModelProto, tmp_path: Path) -> dict[str, str]:
    """Node name -> op type in the graph ONNX Runtime runs (extended level: its QDQ fusions, no layout renames)."""
    target = tmp_path / "optimized.onnx"
    create_session(model.SerializeToString(), SessionSettings(optimization_level="extended"),
                   save_optimized_to=target)
    return {n.name: n.op_type for n in onnx.load_model(target).graph.node}


@pytest.mark.parametrize(("quant_format", "activation"), [
    ("qdq", "uint8"), ("qdq", "int8"), ("qoperator", "uint8"), ("qoperator", "int8"),
])
def test_an_excluded_conv_between_quantized_neighbours_runs_in_float(quant_format: str, activation: str,
                                                                      tmp_path: Path) -> None:
    fused, feeds = _fused()
    first, middle, last = [n.name for n in fused.graph.node if n.op_type == "Conv"]
    config = int8_static.Int8StaticConfig(quant_format=quant_format, activation_type=activation,
                                          nodes_to_exclude=(middle,))
    ran = _as_run(int8_static.run(fused, config, feeds, feeds[0]).model, tmp_path)
    assert ran.get(middle) == "Conv", f"{middle} ran as {ran.get(middle)}"
    # its neighbours keep their INT8 kernels (QDQ names the fused node after the Conv, QOperator adds "_quant")
    for name in (first, last):
        assert "QLinearConv" in {ran.get(name), ran.get(f"{name}_quant")}, ran


def test_pinning_changes_no_value_and_undoes_the_session_time_requantization(tmp_path: Path) -> None:
    """ONNX Runtime's quantizer on its own leaves the excluded Conv reading a per-tensor DequantizeLinear, which the
    session quantizes again; `pin_float` computes the same values and keeps it float."""
    fused, feeds = _fused()
    middle = [n.name for n in fused.graph.node if n.op_type == "Conv"][1]
    source, target = tmp_path / "fused.onnx", tmp_path / "quantized.onnx"
    onnx.save_model(fused, source)
    quantize_static(source, target, int8_static._FeedReader(feeds), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    nodes_to_exclude=[middle])
    plain = onnx.load_model(target)
    pinned = onnx.ModelProto()
    pinned.CopyFrom(plain)
    int8_static.pin_float(pinned, [middle])
    assert _as_run(plain, tmp_path).get(middle) == "QLinearConv"  # what the repair builds were
    assert _as_run(pinned, tmp_path).get(middle) == "Conv"
    as_written = SessionSettings(optimization_level="disabled")
    for feed in feeds[:3]:
        before = create_session(plain.SerializeToString(), as_written).run(None, feed)[0]
        after = create_session(pinned.SerializeToString(), as_written).run(None, feed)[0]
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)

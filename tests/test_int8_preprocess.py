"""quant_pre_process for the INT8 passes: symbolic shape inference only where a tensor would be left untyped.

ORT's symbolic shape inference (sympy) cost 31 s on PP-OCRv4 det; what it adds beyond ONNX's shape
inference is dims, which the quantizers never read. These tests check that skipping it changes nothing
the quantizer writes, and that it still runs where ONNX's inference leaves a tensor without a type.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

from optimizer.passes import cleanup
from optimizer.passes.int8_dynamic import ModelKeys, model_key, pre_process, untyped_tensors
from tests import models


def _quantized(source: Path, target: Path) -> onnx.ModelProto:
    quantize_dynamic(source, target, per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return onnx.load_model(target)


def _nodes_and_weights(model: onnx.ModelProto) -> tuple[list, list]:
    nodes = [(n.op_type, n.domain, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
             for n in model.graph.node]
    weights = sorted((t.name, numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer)
    return nodes, weights


@pytest.mark.parametrize("build", [models.cnn, models.mlp, models.lstm, models.transformer, models.detector])
def test_symbolic_shapes_are_skipped_when_onnx_types_every_tensor_and_the_quantized_model_is_the_same(build):
    model = build()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ours, notes = pre_process(model, workdir, "test")
        with_symbols = workdir / "with_symbols.onnx"
        quant_pre_process(str(workdir / "input.onnx"), str(with_symbols), auto_merge=True)
        assert untyped_tensors(onnx.load_model(ours)) == []
        assert "symbolic shape inference skipped" in notes[0]
        quantized = _quantized(ours, workdir / "q_ours.onnx")
        reference = _quantized(with_symbols, workdir / "q_reference.onnx")
    assert _nodes_and_weights(quantized) == _nodes_and_weights(reference)
    assert sum(n.op_type in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM") for n in quantized.graph.node) > 0


def test_symbolic_shapes_run_when_a_contrib_op_leaves_a_tensor_untyped():
    """After ORT's transformer fusion (Attention, SkipLayerNormalization, BiasGelu), ONNX's shape inference
    cannot type the contrib ops' outputs; symbolic shape inference can, and then runs."""
    base = models.transformer(layers=2)
    fused = cleanup.run(base, cleanup.CleanupConfig(provider="cpu"), feed=models.random_feed(base)).model
    assert any(n.domain == "com.microsoft" for n in fused.graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        onnx.save_model(fused, workdir / "fused.onnx")
        without = workdir / "without.onnx"
        quant_pre_process(str(workdir / "fused.onnx"), str(without), skip_symbolic_shape=True)
        assert len(untyped_tensors(onnx.load_model(without))) >= 4
        ours, notes = pre_process(fused, workdir, "test")
        assert untyped_tensors(onnx.load_model(ours)) == []
    assert "symbolic shape inference with auto_merge" in notes[0] and "untyped without it" in notes[0]


def test_untyped_tensors_sees_a_tensor_no_value_info_types():
    model = models.mlp()
    hidden_tensors = [out for node in model.graph.node[:-1] for out in node.output]
    assert untyped_tensors(model) == sorted(hidden_tensors)  # no value_info yet: only the graph's ends are typed
    inferred = onnx.shape_inference.infer_shapes(model)
    assert untyped_tensors(inferred) == []
    hidden = inferred.graph.value_info[0].name
    del inferred.graph.value_info[0]
    assert untyped_tensors(inferred) == [hidden]


def test_model_keys_hash_a_model_object_once():
    keys = ModelKeys()
    model = models.mlp()
    first = keys(model)
    assert first == model_key(model) == keys(models.mlp())  # an equal model has the same key
    model.graph.node[0].name = "edited"  # a search never edits its source: the object keeps its first key
    assert keys(model) == first != model_key(model)

"""What a model exported by today's torch.onnx meets in onnxforge, rebuilt with onnx.helper (no torch needed).

torch 2.13's torch.onnx.export(..., dynamo=True) writes model.onnx + model.onnx.data when external_data=True (its
default), even for a 1 MB encoder; the service takes one file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.services.uploads import check_contents
from optimizer.errors import ExternalDataError
from optimizer.graph_inspect import inspect


def _dynamo_style_linear(tmp_path: Path) -> Path:
    """A Linear + LayerNormalization (opset 20, IR 10, as the dynamo exporter writes them) saved the way it saves:
    enc.onnx with every weight in enc.onnx.data beside it."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "linear.weight")
    bias = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "linear.bias")
    scale = numpy_helper.from_array(np.ones(64, np.float32), "ln.weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "linear.weight"], ["mm"]),
         helper.make_node("Add", ["mm", "linear.bias"], ["h"]),
         helper.make_node("LayerNormalization", ["h", "ln.weight"], ["y"], axis=-1, epsilon=1e-5)],
        "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 64])],
        [weight, bias, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    path = tmp_path / "enc.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="enc.onnx.data", size_threshold=0)
    return path


def test_an_upload_without_its_data_file_is_told_how_to_inline_it(tmp_path: Path) -> None:
    # The 400 said the data file was "missing from the model's folder" (an upload has no folder) and to call
    # onnx.save_model(model, path, save_as_external_data=False) without saying that onnx.load reads the data file.
    saved = _dynamo_style_linear(tmp_path)
    upload = tmp_path / "upload"
    upload.mkdir()
    sent = upload / "b4c1e2.onnx"  # the service stores the upload alone, under a name of its own
    sent.write_bytes(saved.read_bytes())
    with pytest.raises(ExternalDataError) as caught:
        check_contents(str(sent), None, None, None)
    error = str(caught.value)
    assert "'enc.onnx.data'" in error
    assert "3 tensors" in error and "0.0 MiB" in error  # 32*64+64+64 floats = 8.7 KB
    assert "onnx.save_model(onnx.load('enc.onnx'), 'model_inline.onnx', save_as_external_data=False)" in error
    assert "torch.onnx.export(..., external_data=False)" in error
    assert "model's folder" not in error


def test_the_advised_inline_file_is_accepted(tmp_path: Path) -> None:
    # Doing what the message says gives a file the service takes, with the weights the data file held.
    saved = _dynamo_style_linear(tmp_path)
    inline = tmp_path / "model_inline.onnx"
    onnx.save_model(onnx.load(str(saved)), inline, save_as_external_data=False)
    facts = check_contents(str(inline), None, None, None)
    assert facts["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", "seq", 32]}]
    assert facts["size_bytes"] == inline.stat().st_size > (32 * 64 + 128) * 4


def _sdpa_style_encoder(seed: int = 0) -> onnx.ModelProto:
    """x + F.scaled_dot_product_attention(q, k, v) then LayerNormalization, as torch 2.13's dynamo exporter writes
    it: q and k each scaled by a constant Mul (sqrt of 1/sqrt(d)), MatMul -> Softmax -> MatMul, no Reshape into
    heads that ONNX Runtime's BERT attention fusion looks for."""
    rng = np.random.default_rng(seed)
    d = 16
    weights = [numpy_helper.from_array((rng.standard_normal((d, d)) * 0.3).astype(np.float32), f"w{n}")
               for n in "qkv"]
    scale = numpy_helper.from_array(np.array(d ** -0.25, np.float32), "scale")
    ln_w = numpy_helper.from_array(np.ones(d, np.float32), "ln.weight")
    ln_b = numpy_helper.from_array(np.zeros(d, np.float32), "ln.bias")
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Mul", ["q", "scale"], ["q_s"]),
        helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 2, 1]),
        helper.make_node("Mul", ["k_t", "scale"], ["k_s"]),
        helper.make_node("MatMul", ["q_s", "k_s"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context"]),
        helper.make_node("Add", ["x", "context"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "ln.weight", "ln.bias"], ["y"], axis=-1, epsilon=1e-5),
    ]
    graph = helper.make_graph(nodes, "main_graph",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
                              [*weights, scale, ln_w, ln_b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_attention_the_transformer_optimizer_left_unfused_is_reported() -> None:
    # torch 2.13's encoder (dynamo=True and False): inspect said "fusable: Attention x4", the fused variant had
    # 0 Attention ops, and its note said "transformer fusion adds com.microsoft contrib ops (Attention, ...)".
    from optimizer.graph_inspect import ATTENTION
    from optimizer.passes import cleanup

    model = _sdpa_style_encoder()
    assert inspect(model).fusable_count(ATTENTION) == 1
    result = cleanup.run(model)
    fusion = result.changes["transformer_fusion"]
    assert fusion["used"] is True
    assert "Attention" not in fusion["operators"]
    assert fusion["attention_left"] == 1
    assert any(note.startswith("1 attention pattern(s)") and "left unfused" in note for note in result.notes)
    assert not any("(Attention, SkipLayerNormalization, ...)" in note for note in result.notes)
    # the ops it did add are named, with counts (here the residual Add + LayerNormalization)
    assert fusion["operators"] == {"SkipLayerNormalization": 1}
    assert "transformer fusion added SkipLayerNormalization x1: com.microsoft contrib ops" in " ".join(result.notes)

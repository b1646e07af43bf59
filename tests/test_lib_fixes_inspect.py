"""inspect: an input-to-output no-op is not "redundant" (F13), and an already-quantized model is recognised (F11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from optimizer.graph_inspect import already_quantized, inspect, quantized_ops
from tests import models


def test_an_identity_from_a_graph_input_to_a_graph_output_is_not_redundant() -> None:
    report = inspect(models.typed_io())  # small -> Identity -> small_same, text -> Identity -> text_same
    assert report.op_histogram["Identity"] == 2
    assert [f for f in report.redundant if f.kind == "identity"] == []


def test_a_removable_identity_is_still_redundant() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Identity", ["x"], ["copy"], name="inner"),  # feeds a node: removable
             helper.make_node("Relu", ["copy"], ["r"]),
             helper.make_node("Identity", ["r"], ["y"], name="tail"),  # Relu can write `y` itself: removable
             helper.make_node("Identity", ["y"], ["z"], name="twin")]  # output to output: both names stay
    model = helper.make_model(helper.make_graph(nodes, "ids", [x], [y, z]),
                              opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    found = [f.nodes for f in inspect(model).redundant if f.kind == "identity"]
    assert found == [["inner"], ["tail"]]


def test_a_transpose_pair_from_input_to_output_is_not_redundant() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Transpose", ["t"], ["y"],
                                                                                        perm=[1, 0])]
    model = helper.make_model(helper.make_graph(nodes, "pair", [x], [y]),
                              opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    assert inspect(model).redundant == []


def test_a_float_model_is_not_quantized() -> None:
    assert quantized_ops(inspect(models.mlp())) == {}
    assert already_quantized(models.mlp()) is None


def test_a_dynamic_int8_model_is_already_quantized(tmp_path: Path) -> None:
    onnx.save(models.mlp(), tmp_path / "fp32.onnx")
    quantize_dynamic(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", weight_type=QuantType.QInt8)
    int8 = onnx.load(tmp_path / "int8.onnx")
    found = quantized_ops(inspect(int8))
    assert found["MatMulInteger"] == 3 and found["DynamicQuantizeLinear"] >= 1
    note = already_quantized(int8)
    assert note is not None and note.startswith("the model is already quantized (") and "MatMulInteger x3" in note
    assert "INT8 variants are not built" in note
    assert already_quantized(inspect(int8)) == note  # from the report the pipeline already has, too


def test_a_qdq_model_is_already_quantized() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], [scale, zero]),
                              opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    assert quantized_ops(inspect(model)) == {"DequantizeLinear": 1, "QuantizeLinear": 1}

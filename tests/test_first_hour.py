"""What a new user ran into in a first hour with the service, the CLI and the library (one test each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer.graph_inspect import inspect
from tests import models
from tests.conftest import assert_only_good_serves, post_bad, serving_good_model


def _model_with_weights_in_an_if(features: int = 16) -> onnx.ModelProto:
    """y = x @ W1 if flag else x @ W2, both weights inside the branches (how silero VAD keeps all of its own)."""
    rng = np.random.default_rng(0)

    def branch(name: str, weight_in_initializer: bool) -> onnx.GraphProto:
        weight = rng.normal(size=(features, features)).astype(np.float32)
        if weight_in_initializer:
            nodes = [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])]
            inits = [numpy_helper.from_array(weight, f"{name}_w")]
        else:
            nodes = [helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(weight)),
                     helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])]
            inits = []
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                  None)], inits)

    node = helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", True), else_branch=branch("else", False))
    graph = helper.make_graph(
        [node], "if_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, features])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_inspect_counts_the_weights_inside_if_branches() -> None:
    # `onnxforge inspect silero_vad.onnx` said "5 nodes, 1 parameters (0.0 KiB)" for a 2.3 MB model.
    report = inspect(_model_with_weights_in_an_if(features=16))
    assert report.node_count == 1  # the main graph's nodes only, as documented
    assert report.parameter_count == 2 * 16 * 16
    assert report.parameter_bytes == 2 * 16 * 16 * 4


def test_a_model_with_a_too_new_opset_is_refused_with_what_to_change(tmp_path: Path) -> None:
    # The 400 quoted ONNX Runtime whole: the server's temporary upload path and a C++ signature, no advice.
    model = models.mlp()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 2
    with serving_good_model(tmp_path / "data", run_worker=False) as api:
        response = post_bad(api, model.SerializeToString())
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert str(api.services.settings.data_dir) not in error
        assert "onnxruntime_src" not in error and "::" not in error
        assert f"export it again with opset {onnx.defs.onnx_opset_version()} or lower" in error
        assert_only_good_serves(api)

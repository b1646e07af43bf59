"""Fixing an input's value turns an input-driven If into a constant one, which cleanup then inlines."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import PassError
from optimizer.passes import cleanup, specialize
from optimizer.runtime import create_session


def _rate_switch_model() -> onnx.ModelProto:
    """Silero VAD's layout in small: y = relu(x @ W16) if sr == 16000 else relu(x @ W8), sr an input."""
    rng = np.random.default_rng(7)

    def branch(name: str) -> onnx.GraphProto:
        weight = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), f"w_{name}")
        nodes = [helper.make_node("MatMul", ["x", f"w_{name}"], [f"m_{name}"]),
                 helper.make_node("Relu", [f"m_{name}"], [f"y_{name}"])]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, None)],
                                 [weight])

    nodes = [helper.make_node("Constant", [], ["k16"], value=numpy_helper.from_array(np.array(16000, np.int64))),
             helper.make_node("Equal", ["sr", "k16"], ["is16"]),
             helper.make_node("If", ["is16"], ["y"], then_branch=branch("then"), else_branch=branch("else"))]
    graph = helper.make_graph(nodes, "rate_switch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                                                     helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("rate", [16000, 8000])
def test_fixed_rate_inlines_the_taken_branch(rate: int) -> None:
    model = _rate_switch_model()
    x = np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32)
    want = create_session(model.SerializeToString()).run(None, {"x": x, "sr": np.array(rate, np.int64)})[0]

    fixed = specialize.run(model, {"sr": rate})
    assert [v.name for v in fixed.model.graph.input] == ["x"]
    assert fixed.changes["fixed_inputs"] == {"sr": rate}
    cleaned = cleanup.run(fixed.model, feed={"x": x})
    assert Counter(n.op_type for n in cleaned.model.graph.node) == {"MatMul": 1, "Relu": 1}  # no If left
    got = create_session(cleaned.model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    other = 8000 if rate == 16000 else 16000
    wrong = create_session(model.SerializeToString()).run(None, {"x": x, "sr": np.array(other, np.int64)})[0]
    assert np.abs(got - wrong).max() > 0.1  # the branches differ, so the right one was taken
    assert [v.name for v in model.graph.input] == ["x", "sr"]  # the input model is left alone


def test_a_client_still_sending_the_fixed_input_is_refused() -> None:
    fixed = specialize.run(_rate_switch_model(), {"sr": 16000}).model
    session = create_session(fixed.SerializeToString())
    with pytest.raises(Exception, match="sr"):
        session.run(None, {"x": np.zeros((1, 8), np.float32), "sr": np.array(8000, np.int64)})


@pytest.mark.parametrize(("values", "message"), [
    ({}, "no inputs"),
    ({"rate": 16000}, "no input named 'rate'"),
    ({"sr": 16000.5}, "sr"),
    ({"sr": [16000, 8000]}, "shape"),
    ({"x": np.zeros((1, 8)), "sr": 16000}, "no inputs"),
])
def test_bad_values_are_refused(values: dict, message: str) -> None:
    with pytest.raises(PassError, match=message):
        specialize.run(_rate_switch_model(), values)

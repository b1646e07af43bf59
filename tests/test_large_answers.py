"""A large answer is encoded off the event loop (Prediction.large) and still answered whole, on /v1 and /v2 JSON.

The model makes an output whose size the client picks (ConstantOfShape of an input's values): the review's 200 MB
JSON answer held the event loop, and every other request, for 5.8 s.
"""

from __future__ import annotations

import numpy as np
import onnx
import orjson
from onnx import TensorProto, helper

from app.services.predict import LARGE_ANSWER_ELEMENTS, Prediction


def _filled(value: float = 0.5) -> onnx.ModelProto:
    """out = a [shape[0], shape[1]] float32 tensor of `value`, the shape read from the int64 input `shape`."""
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [value])
    node = helper.make_node("ConstantOfShape", ["shape"], ["out"], value=fill)
    graph = helper.make_graph([node], "filled", [helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["rows", "cols"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_large_is_decided_by_the_answers_elements() -> None:
    small = Prediction("m", 1, "original", "cpu", {"out": np.zeros(LARGE_ANSWER_ELEMENTS, np.float32)})
    big = Prediction("m", 1, "original", "cpu", {"a": np.zeros(LARGE_ANSWER_ELEMENTS, np.float32),
                                                 "b": np.zeros(1, np.float32)})
    assert not small.large and big.large


def test_a_large_answer_is_whole_on_v1_and_v2_json(serve) -> None:  # noqa: ANN001
    rows, cols = 600, 1000  # 600K elements: past LARGE_ANSWER_ELEMENTS, encoded in a thread
    assert rows * cols > LARGE_ANSWER_ELEMENTS
    with serve(run_worker=False) as api:
        assert api.upload(_filled(), name="filled", precision="fp32").status_code == 202
        v1 = api.predict("filled", {"shape": [rows, cols]})
        assert v1.status_code == 200, v1.text
        out = np.asarray(orjson.loads(v1.content)["outputs"]["out"], np.float32)
        assert out.shape == (rows, cols) and np.all(out == 0.5)
        v2 = api.client.post("/v2/models/filled/infer", json={
            "id": "big", "inputs": [{"name": "shape", "shape": [2], "datatype": "INT64", "data": [rows, cols]}]})
        assert v2.status_code == 200, v2.text
        answer = orjson.loads(v2.content)
        assert answer["id"] == "big" and answer["outputs"][0]["shape"] == [rows, cols]
        assert len(answer["outputs"][0]["data"]) == rows * cols and set(answer["outputs"][0]["data"]) == {0.5}
        small = api.predict("filled", {"shape": [2, 3]})  # the quick way still answers the same
        assert small.status_code == 200 and orjson.loads(small.content)["outputs"]["out"] == [[0.5] * 3] * 2

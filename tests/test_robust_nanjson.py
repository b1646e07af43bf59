"""/v2 JSON outputs with NaN or Inf: written by orjson from the array (null for each, as /v1 and KServe write them),
the finite values beside them exactly as in an output without any (the shortest float32 text), and tritonclient's
reading of the answer gives NaN where the model gave NaN or Inf."""

from __future__ import annotations

import numpy as np
import onnx
import orjson
from onnx import TensorProto as T
from onnx import helper as h


def log_model() -> onnx.ModelProto:
    graph = h.make_graph(
        [h.make_node("Log", ["x"], ["y"])],
        "log",
        [h.make_tensor_value_info("x", T.FLOAT, ["n"])],
        [h.make_tensor_value_info("y", T.FLOAT, ["n"])],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_nan_and_inf_outputs_are_null_and_the_rest_unchanged(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(log_model(), "log.onnx", name="log").status_code == 202
        x = [1.1, 0.0, -1.0, 7.3, 1e30, 2.0] * 50  # log: finite, -inf, nan, ...
        body = {"inputs": [{"name": "x", "shape": [len(x)], "datatype": "FP32", "data": x}]}
        response = api.client.post("/v2/models/log/infer", json=body)
        assert response.status_code == 200, response.text
        expected = np.log(np.asarray(x, np.float32))
        finite = np.isfinite(expected)
        assert (~finite).sum() == 100
        written = orjson.loads(response.content)["outputs"][0]["data"]
        assert [v is None for v in written] == (~finite).tolist()
        # the finite values' text is the shortest float32 one, as in an answer without NaN
        values = np.asarray([v for v in written if v is not None], np.float32)
        shortest = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY).decode()[1:-1]
        data = response.content.decode().split('"data":[')[1].split("]")[0]
        assert data.replace("null,", "").replace(",null", "") == shortest
        np.testing.assert_allclose(
            np.asarray([v for v in written if v is not None], np.float32), expected[finite], rtol=1e-6
        )
        as_client_reads = np.asarray(written, dtype=np.float32)  # tritonclient: np.array(data, dtype=...)
        assert np.isnan(as_client_reads[~finite]).all()

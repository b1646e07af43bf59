"""/metrics tells a client's bad inputs (rejected) from a model whose run fails (failed), per model version."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper


def _reshape_to_seven_by_seven() -> onnx.ModelProto:
    """y = Reshape(x, [7, 7]) with x [batch, 4]: every input that passes the declared checks fails in the run."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [7, 7])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "runfail",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 7])], initializer=[shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _count(text: str, outcome: str) -> float:
    series = f'onnxforge_predict_requests_total{{model="runfail",outcome="{outcome}",variant="original",version="1"}}'
    lines = [line for line in text.splitlines() if line.startswith(series + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_failing_run_is_failed_and_a_bad_input_is_rejected(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(_reshape_to_seven_by_seven(), name="runfail", precision="fp32").status_code == 202
        run = api.predict("runfail", {"x": np.ones((1, 4), np.float32)})
        assert run.status_code == 400 and "could not run" in run.json()["error"]
        for bad in ({"x": [[1.0, 2.0]]}, {"z": [[1.0, 2.0, 3.0, 4.0]]}):  # wrong width, unknown input
            assert api.predict("runfail", bad).status_code == 400
        text = api.client.get("/metrics").text
        assert (_count(text, "ok"), _count(text, "rejected"), _count(text, "failed")) == (0, 2, 1)

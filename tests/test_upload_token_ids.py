"""Calibration token ids past an embedding's rows are refused at upload (400 naming the input, the value and the row
count), not accepted and failed later by ONNX Runtime inside the job (optimizer.input_ranges)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import CalibrationError
from optimizer.input_ranges import IndexLimit, check_index_ranges, index_limits
from tests.conftest import npz

VOCAB, DIM = 12, 4


def embedding(path: str = "direct") -> onnx.ModelProto:
    """`pooled[b] = mean(table[ids[b, :]])`, the ids reaching the Gather `path`: directly, through a Cast to int32,
    or through Unsqueeze + Reshape (shape-only steps, as exporters write)."""
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((VOCAB, DIM)).astype(np.float32), "table")
    inits, nodes, ids = [table], [], "ids"
    if path == "cast":
        nodes.append(helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32))
        ids = "ids32"
    elif path == "reshape":
        inits += [numpy_helper.from_array(np.array([0], np.int64), "axis0"),
                  numpy_helper.from_array(np.array([-1, 6], np.int64), "flat")]
        nodes += [helper.make_node("Unsqueeze", ["ids", "axis0"], ["ids_u"]),
                  helper.make_node("Reshape", ["ids_u", "flat"], ["ids_flat"])]
        ids = "ids_flat"
    nodes += [helper.make_node("Gather", ["table", ids], ["vectors"], name="lookup"),
              helper.make_node("ReduceMean", ["vectors"], ["pooled"], axes=[-2], keepdims=0)]
    ids_in = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 6])
    graph = helper.make_graph(nodes, "embedding", [ids_in],
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("path", ["direct", "cast", "reshape"])
def test_an_integer_input_that_indexes_an_initializer_is_bounded_by_its_rows(path: str) -> None:
    assert index_limits(embedding(path)) == {"ids": IndexLimit(VOCAB, "table", "lookup")}


def test_inputs_that_index_no_table_have_no_bound() -> None:
    first = numpy_helper.from_array(np.array(0, np.int64), "first")
    graph = helper.make_graph([helper.make_node("Gather", ["ids", "first"], ["y"], axis=1)], "data",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, ["batch"])], [first])
    assert index_limits(helper.make_model(graph)) == {}  # the input is the data a constant index picks from
    model = embedding()
    model.graph.input.append(helper.make_tensor_value_info("table", TensorProto.FLOAT, [VOCAB, DIM]))
    model.graph.ClearField("initializer")  # the table is an input: its rows are the caller's, not known
    assert index_limits(model) == {}


def test_check_index_ranges_names_the_input_the_value_and_the_rows() -> None:
    model = embedding("cast")
    fine = [{"ids": np.array([[0, 1, 2, 3, 4, VOCAB - 1]], np.int64)}]
    check_index_ranges(model, fine, "samples.npz")
    for bad in (VOCAB, VOCAB + 30000, -1):
        feeds = [*fine, {"ids": np.array([[0, 1, bad, 3, 4, 5]], np.int64)}]
        with pytest.raises(CalibrationError) as refused:
            check_index_ranges(model, feeds, "samples.npz")
        message = str(refused.value)
        assert f"'ids' holds the value {bad}," in message and f"the {VOCAB} rows" in message, message
        assert f"0 to {VOCAB - 1}" in message and message.startswith("samples.npz"), message


def test_onnx_runtime_itself_refuses_the_id_the_check_refuses() -> None:
    """What the check saves the user from: the job's ONNX Runtime run fails on an id equal to the row count."""
    session = ort.InferenceSession(embedding().SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {"ids": np.full((1, 6), VOCAB - 1, np.int64)})
    with pytest.raises(Exception, match="out of"):
        session.run(None, {"ids": np.full((1, 6), VOCAB, np.int64)})


def test_upload_refuses_calibration_ids_past_the_vocabulary(data_dir: Path, serve) -> None:  # noqa: ANN001
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(8, 6)).astype(np.int64)
    with serve(run_worker=False) as api:
        bad = ids.copy()
        bad[5, 2] = VOCAB + 3
        refused = api.upload(embedding("cast"), "emb.onnx", calibration=npz(ids=bad))
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert f"'ids' holds the value {VOCAB + 3}," in error and f"the {VOCAB} rows" in error, error
        assert api.client.get("/v1/models").json() == []  # nothing kept
        accepted = api.upload(embedding("cast"), "emb.onnx", calibration=npz(ids=ids))
        assert accepted.status_code == 202, accepted.text

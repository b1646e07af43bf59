"""Empty tensors and repeated names on the predict paths: a clear 400 when the shape is wrong for the model,
the answer ONNX Runtime gives when it is right (a batch of 0 rows is a valid tensor), never a 500.

A reviewer found `[]` for an integer input answered 500 on /v1 (the range check took the max of an empty array),
/v2 JSON `data: []` for INT32 refused as "numbers with a fraction", a /v2 input named twice accepted, and
(found here) a batch of only empty requests broke the batcher's bookkeeping, stalling the requests behind it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.runtime.batching import Batcher, BatchPolicy
from optimizer.runtime import SessionSettings, create_session


def ids_model(dtype: int = TensorProto.INT64, seq: int | str = 4) -> onnx.ModelProto:
    """`vectors[b, s] = table[ids[b, s]]`: an integer input, as token ids are (Gather from a 10x3 table)."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 3], np.arange(30, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["vectors"])], "ids",
        [helper.make_tensor_value_info("ids", dtype, ["batch", seq])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["batch", seq, 3])], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ort(model: onnx.ModelProto, ids: list) -> np.ndarray:
    dtype = helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    return create_session(model.SerializeToString()).run(["vectors"], {"ids": np.array(ids, dtype)})[0]


@pytest.mark.parametrize("dtype", [TensorProto.INT32, TensorProto.INT64])
def test_v1_empty_lists_for_an_integer_input_are_a_shape_400(serve, dtype: int) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(ids_model(dtype), name="ids").status_code == 202
        for ids, got in (([], "expects 2 dimensions [batch, 4], got shape [0]"),
                         ([[]], "expects shape [batch, 4], got [1, 0] (axis 1 must be 4)")):
            response = api.client.post("/v1/models/ids/predict", json={"inputs": {"ids": ids}})
            assert response.status_code == 400, response.text
            assert response.json() == {"error": f"input 'ids' {got}"}
        response = api.client.post("/v1/models/ids/predict", json={"inputs": {"ids": [[1, 2, 3, 9]]}})
        assert response.status_code == 200, response.text
        assert response.json()["outputs"]["vectors"] == _ort(ids_model(dtype), [[1, 2, 3, 9]]).tolist()


def test_v1_an_empty_sequence_the_model_accepts_is_answered_like_onnx_runtime(serve) -> None:  # noqa: ANN001
    model = ids_model(seq="seq")  # [batch, seq]: [[]] is one row of zero tokens, which ORT runs
    expected = _ort(model, [[]])
    assert expected.shape == (1, 0, 3)
    with serve(run_worker=False) as api:
        assert api.upload(model, name="ids").status_code == 202
        response = api.client.post("/v1/models/ids/predict", json={"inputs": {"ids": [[]]}})
        assert response.status_code == 200, response.text
        assert response.json()["outputs"]["vectors"] == expected.tolist() == [[]]


@pytest.mark.parametrize(("datatype", "dtype"), [("INT32", TensorProto.INT32), ("INT64", TensorProto.INT64)])
def test_v2_json_empty_data_is_an_empty_tensor_not_a_fraction(serve, datatype: str,  # noqa: ANN001
                                                              dtype: int) -> None:
    with serve(run_worker=False) as api:
        assert api.upload(ids_model(dtype), name="ids").status_code == 202
        # the reviewer's request: the shape is wrong for this model, and that is what the 400 says
        wrong = {"inputs": [{"name": "ids", "shape": [0, 2048], "datatype": datatype, "data": []}]}
        response = api.client.post("/v2/models/ids/infer", json=wrong)
        assert response.status_code == 400, response.text
        assert response.json() == {"error": "input 'ids' expects shape [batch, 4], got [0, 2048] (axis 1 must be 4)"}
        # a batch of 0 rows of the right shape: ONNX Runtime runs it, so it is answered
        empty = {"inputs": [{"name": "ids", "shape": [0, 4], "datatype": datatype, "data": []}]}
        response = api.client.post("/v2/models/ids/infer", json=empty)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"] == [{"name": "vectors", "datatype": "FP32", "shape": [0, 4, 3], "data": []}]
        # data with a fraction is still refused as such
        bad = {"inputs": [{"name": "ids", "shape": [1, 4], "datatype": datatype, "data": [1.5, 2, 3, 4]}]}
        response = api.client.post("/v2/models/ids/infer", json=bad)
        assert response.status_code == 400, response.text
        assert response.json()["error"] == f"input 'ids': {datatype} data must be integers, got numbers with a fraction"


def test_v2_bool_empty_data_is_an_empty_tensor(serve) -> None:  # noqa: ANN001
    from tests import models

    with serve(run_worker=False) as api:
        assert api.upload(models.typed_io(), name="typed").status_code == 202
        body = {"inputs": [{"name": "half", "shape": [0, 4], "datatype": "FP16", "data": []},
                           {"name": "flag", "shape": [0, 4], "datatype": "BOOL", "data": []},
                           {"name": "small", "shape": [0, 4], "datatype": "UINT8", "data": []},
                           {"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]}
        response = api.client.post("/v2/models/typed/infer", json=body)
        assert response.status_code == 200, response.text
        shapes = {o["name"]: (o["shape"], o["data"]) for o in response.json()["outputs"]}
        assert shapes == {"half_twice": ([0, 4], []), "flag_not": ([0, 4], []), "small_same": ([0, 4], []),
                          "text_same": ([0], [])}


def test_v2_an_input_named_twice_is_a_400_naming_it(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(ids_model(), name="ids").status_code == 202
        body = {"inputs": [{"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]},
                           {"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": [5, 6, 7, 8]}]}
        response = api.client.post("/v2/models/ids/infer", json=body)
        assert response.status_code == 400, response.text
        assert response.json() == {"error": "input 'ids' is given twice: name each input once"}


def test_batches_of_empty_requests_do_not_stall_the_queue() -> None:
    """One run slot, groups (one per sequence length) of 0-row requests and then a real one: each batch's end
    must hand the slot on. Before, timing a 0-row batch (from the third run on: the first `max_running` runs
    are not timed) raised in the run's done callback after the slot was freed but before the next group was
    dispatched: the groups behind it waited for a request that never came."""
    model = ids_model(seq="seq")
    session = create_session(model.SerializeToString(), SessionSettings(intra_op_threads=1))
    feeds = [{"ids": np.zeros((0, seq), np.int64)} for seq in (3, 5, 7)] + [{"ids": np.ones((2, 9), np.int64)}]

    async def main() -> list:
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(executor, max_batch_size=8, max_running=1)
            runs = (batcher.run("key", session, ["vectors"], f, BatchPolicy(max_batch_size=8)) for f in feeds)
            return await asyncio.wait_for(asyncio.gather(*runs), 10)  # a stalled queue fails here, not hangs

    results = asyncio.run(main())
    for feed, (got,) in zip(feeds, results, strict=True):
        np.testing.assert_array_equal(got, session.run(["vectors"], feed)[0])
    assert [got.shape for (got,) in results] == [(0, 3, 3), (0, 5, 3), (0, 7, 3), (2, 9, 3)]

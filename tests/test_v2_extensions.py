"""/v2 as an app moved from Triton uses it: Triton's extensions through the real tritonclient (sync and aio).

Classification (InferRequestedOutput(class_count=k)) and the model repository's index and load are served; the
extensions onnxforge does not have (statistics, shared memory, trace, log settings, unload) answer a 400 in the one
error shape that says what to do instead, not a 404 that reads like a typo (GET /v2/models/stats was "no model
'stats'"). BF16 models are described as BF16 (was "tensor(bfloat16)") and refused with the reason at infer.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.errors import BadRequestError
from app.protocol.v2_codec import decode_request, top_classes
from optimizer.runtime import create_session
from tests import models
from tests.service import serving_models

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
aioclient = pytest.importorskip("tritonclient.http.aio", reason="tritonclient[http] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402


def _bf16_identity() -> onnx.ModelProto:
    """y = x in bfloat16, and z = float(x): ONNX Runtime loads it, its Python API cannot feed it."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Cast", ["x"], ["z"], to=TensorProto.FLOAT)],
        "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["batch", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


_NUMBERS = {"INT8": TensorProto.INT8, "INT16": TensorProto.INT16, "INT32": TensorProto.INT32,
            "INT64": TensorProto.INT64, "UINT16": TensorProto.UINT16, "UINT32": TensorProto.UINT32,
            "UINT64": TensorProto.UINT64, "FP64": TensorProto.DOUBLE}


def _identities() -> onnx.ModelProto:
    """One Identity per numeric v2 datatype typed_io does not carry: `<datatype>` -> `<datatype>_out`."""
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in _NUMBERS]
    inputs = [helper.make_tensor_value_info(name, kind, ["batch", 3]) for name, kind in _NUMBERS.items()]
    outputs = [helper.make_tensor_value_info(f"{name}_out", kind, ["batch", 3]) for name, kind in _NUMBERS.items()]
    graph = helper.make_graph(nodes, "identities", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _gate() -> onnx.ModelProto:
    """pos = x > 0 (BOOL), r = relu(x): batchable, a numeric and a boolean output."""
    graph = helper.make_graph(
        [helper.make_node("Greater", ["x", "zero"], ["pos"]), helper.make_node("Relu", ["x"], ["r"])], "gate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("pos", TensorProto.BOOL, ["batch", 4]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 4])],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


MODELS = {"mlp": models.mlp(), "typed": models.typed_io(), "bf16": _bf16_identity(), "numbers": _identities(),
          "gate": _gate()}
BATCHED = {"gate": "8"}  # its batch size: requests answered from their batch (app/http_protocol.py's short path)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - yields "127.0.0.1:port"
    uploads = {name: (model, {"batch_max_size": BATCHED[name]} if name in BATCHED else {})
               for name, model in MODELS.items()}
    with serving_models(tmp_path_factory.mktemp("v2ext"), uploads) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: str):  # noqa: ANN201
    client = httpclient.InferenceServerClient(server)
    yield client
    client.close()


def _features(rows: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(rows).normal(size=(rows, 64)).astype(np.float32)
    return x, create_session(MODELS["mlp"].SerializeToString()).run(None, {"features": x})[0]


def _expected_top(logits: np.ndarray, k: int) -> list[list[str]]:
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [[f"{row[i]:f}:{i}" for i in idx] for row, idx in zip(logits, order, strict=True)]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_class_count_gives_the_top_classes_as_triton_writes_them(client, binary: bool) -> None:  # noqa: ANN001
    x, logits = _features(3)
    tensor = httpclient.InferInput("features", [3, 64], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    for _ in range(2):  # the second request replays the binary header's plan (v2_codec._PLANS)
        result = client.infer("mlp", [tensor], outputs=[
            httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=3)])
        output = result.get_output("logits")
        assert output["datatype"] == "BYTES" and output["shape"] == [3, 3]
        got = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in result.as_numpy("logits")]
        assert got == _expected_top(logits, 3)


def test_class_count_beside_a_plain_output_and_past_the_class_count(client) -> None:  # noqa: ANN001
    rng = np.random.default_rng(1)
    half = rng.normal(size=(2, 4)).astype(np.float16)
    feed = {"half": half, "flag": np.ones((2, 4), bool), "small": np.array([[1, 9, 9, 3], [0, 0, 0, 0]], np.uint8),
            "text": np.array(["a", "b"], dtype=object)}
    inputs = []
    for name, array in feed.items():
        tensor = httpclient.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else
                                       {np.float16: "FP16", np.bool_: "BOOL", np.uint8: "UINT8"}[array.dtype.type])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("typed", inputs, outputs=[
        httpclient.InferRequestedOutput("small_same", class_count=10), httpclient.InferRequestedOutput("half_twice")])
    # integers as integers; 10 asked of 4 classes gives 4; ties to the lower index
    assert result.as_numpy("small_same").tolist() == [[b"9:1", b"9:2", b"3:3", b"1:0"], [b"0:0", b"0:1", b"0:2",
                                                                                         b"0:3"]]
    np.testing.assert_array_equal(result.as_numpy("half_twice"), half + half)
    with pytest.raises(InferenceServerException, match="needs a numeric output, it is BOOL"):
        client.infer("typed", inputs, outputs=[httpclient.InferRequestedOutput("flag_not", class_count=1)])


def test_class_count_in_batched_requests(client, server: str) -> None:  # noqa: ANN001
    """Requests combined into one run: each gets its own top classes, and a refusal (BOOL) is each one's 400."""
    tensors = []
    for row in ([1, -2, 3, -4], [0, 5, -1, 2]):
        tensor = httpclient.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([row], np.float32))
        tensors.append(tensor)
    with httpclient.InferenceServerClient(server, concurrency=8) as batching:
        good = [batching.async_infer("gate", [tensors[i % 2]], outputs=[
            httpclient.InferRequestedOutput("r", class_count=2)]) for i in range(8)]
        bad = [batching.async_infer("gate", [tensors[0]], outputs=[
            httpclient.InferRequestedOutput("pos", class_count=2)]) for _ in range(4)]
        for i, pending in enumerate(good):
            assert pending.get_result().as_numpy("r").tolist() == [[b"3.000000:2", b"1.000000:0"],
                                                                   [b"5.000000:1", b"2.000000:3"]][i % 2:i % 2 + 1]
        for pending in bad:
            with pytest.raises(InferenceServerException, match="needs a numeric output, it is BOOL"):
                pending.get_result()
    rows = [line for line in httpx.get(f"http://{server}/metrics").text.splitlines()
            if line.startswith('onnxforge_batch_size_sum{model="gate"')]
    assert rows and float(rows[0].split()[-1]) >= 12  # every request went through the batcher


def test_top_classes_rank_nan_last_and_keep_a_rank_one_output_flat() -> None:
    scores = np.array([[1.0, np.nan, 10.0, 4.0]], np.float32)
    assert top_classes("y", scores, 4).tolist() == [["10.000000:2", "4.000000:3", "1.000000:0", "nan:1"]]
    assert top_classes("y", np.array([3, -7, 5], np.int64), 2).tolist() == ["5:2", "3:0"]
    assert top_classes("y", np.zeros((0, 5), np.float32), 2).shape == (0, 2)


@pytest.mark.parametrize(("count", "message"), [(-1, "non-negative integer"), ("3", "non-negative integer"),
                                                (True, "non-negative integer")])
def test_a_class_count_that_is_not_a_count_is_refused(count: object, message: str) -> None:
    import orjson

    body = orjson.dumps({"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": count}}]})
    with pytest.raises(BadRequestError, match=message):
        decode_request(body, None)
    zero = orjson.dumps({"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 0}}]})
    assert decode_request(zero, None).classification == {}  # 0: the tensor itself


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_integer_datatype_at_its_limits_and_fp64_round_trip(client, binary: bool) -> None:  # noqa: ANN001
    """JSON UINT64 values over 2**63 were refused as "numbers with a fraction" (numpy reads them as float64)."""
    from tritonclient.utils import triton_to_np_dtype

    sent, inputs = {}, []
    for name in _NUMBERS:
        dtype = np.dtype(triton_to_np_dtype(name))
        info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
        sent[name] = np.array([[info.min, info.max, 0], [1, 2 ** 53 + 1 if dtype.itemsize == 8 else 3, 5]], dtype)
        tensor = httpclient.InferInput(name, [2, 3], name)
        tensor.set_data_from_numpy(sent[name], binary_data=binary)
        inputs.append(tensor)
    result = client.infer("numbers", inputs, outputs=[
        httpclient.InferRequestedOutput(f"{name}_out", binary_data=binary) for name in _NUMBERS])
    for name, array in sent.items():
        got = result.as_numpy(f"{name}_out")
        assert got.dtype == array.dtype and got.tolist() == array.tolist(), name


def test_nan_and_infinity_in_json_tensors_as_tritonclient_writes_them(client) -> None:  # noqa: ANN001
    """tritonclient's JSON (Python's json) writes NaN, Infinity and -Infinity, as Triton reads them: orjson refused
    the whole request ("does not parse"). Missing values as NaN are common in tabular models' features."""
    inputs = []
    for name in _NUMBERS:
        array = np.zeros((1, 3), np.dtype(name.lower().replace("fp", "float")))  # e.g. "uint16", "float64"
        if name == "FP64":
            array = np.array([[np.nan, np.inf, -np.inf]])
        tensor = httpclient.InferInput(name, [1, 3], name)
        tensor.set_data_from_numpy(array, binary_data=False)
        inputs.append(tensor)
    result = client.infer("numbers", inputs, outputs=[httpclient.InferRequestedOutput("FP64_out", binary_data=True)])
    got = result.as_numpy("FP64_out")
    assert np.isnan(got[0, 0]) and got[0, 1:].tolist() == [np.inf, -np.inf]
    with pytest.raises(BadRequestError, match="does not parse"):  # what orjson refuses besides them, still refused
        decode_request(b'{"id": NaN, "inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", '
                       b'"data": ["\\ud800"]}]}', None)


def test_null_in_a_float_json_tensor_is_nan(server: str) -> None:
    """KServe's client serializes with orjson, which writes NaN and Inf as null (as these answers write them): a
    float tensor with null was refused as "must be numbers". Elsewhere null stays refused."""
    import orjson

    inputs = [{"name": name, "shape": [1, 3], "datatype": name, "data": [0, 0, 0]} for name in _NUMBERS]
    sent = orjson.loads(orjson.dumps([float("nan"), 1.5, float("inf")]))  # what KServe's InferRequest.to_rest sends
    assert sent == [None, 1.5, None]
    inputs[-1]["data"] = sent
    outputs = [{"name": "FP64_out", "parameters": {"binary_data": False}}]
    answer = httpx.post(f"http://{server}/v2/models/numbers/infer", json={"inputs": inputs, "outputs": outputs})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [None, 1.5, None]  # NaN in, NaN out (written as null)
    inputs[0]["data"] = [None, 1, 2]  # INT8
    refused = httpx.post(f"http://{server}/v2/models/numbers/infer", json={"inputs": inputs})
    assert refused.status_code == 400 and "INT8 data must be numbers" in refused.json()["error"]


def test_server_metadata_lists_what_is_served(client) -> None:  # noqa: ANN001
    from optimizer import __version__

    metadata = client.get_server_metadata()
    assert metadata["extensions"] == ["binary_tensor_data", "classification", "model_repository"]
    assert metadata["version"] == __version__  # the package's, as `onnxforge --version` says (was a literal)


def test_repository_index_and_load(client, server: str) -> None:  # noqa: ANN001
    index = client.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        (name, "1", "READY") for name in MODELS}
    ready = httpx.post(f"http://{server}/v2/repository/index", json={"ready": True})
    assert ready.status_code == 200 and len(ready.json()) == len(MODELS)
    bad = httpx.post(f"http://{server}/v2/repository/index", content=b"[1]")
    assert bad.status_code == 400 and "JSON object or empty" in bad.json()["error"]
    huge = httpx.post(f"http://{server}/v2/repository/index", content=b" " * (64 * 1024 + 1))
    assert huge.status_code == 413 and "holds options" in huge.json()["error"]
    client.load_model("mlp")  # loads its session: ready at once
    assert client.is_model_ready("mlp")
    with pytest.raises(InferenceServerException, match="no model 'nope'") as missing:
        client.load_model("nope")
    assert missing.value.status() == "404"
    with pytest.raises(InferenceServerException, match="load parameters .* not supported") as refused:
        client.load_model("mlp", config='{"max_batch_size": 8}')
    assert refused.value.status() == "400"


@pytest.mark.parametrize(("call", "message"), [
    (lambda c: c.unload_model("mlp"), "unloading on request is not supported"),
    (lambda c: c.get_inference_statistics(), "statistics extension is not supported"),
    (lambda c: c.get_inference_statistics("mlp", "1"), "statistics extension is not supported"),
    (lambda c: c.register_system_shared_memory("r", "/k", 16), "shared memory is not supported"),
    (lambda c: c.get_system_shared_memory_status("r"), "shared memory is not supported"),
    (lambda c: c.get_trace_settings(), "trace extension is not supported"),
    (lambda c: c.update_trace_settings("mlp", {"trace_level": ["TIMESTAMPS"]}), "trace extension is not supported"),
    (lambda c: c.get_log_settings(), "ONNXFORGE_LOG_LEVEL"),
    (lambda c: c.update_log_settings({"log_verbose_level": 1}), "ONNXFORGE_LOG_LEVEL"),
], ids=["unload", "stats", "stats-model", "shm-register", "shm-region", "trace", "trace-update", "log", "log-update"])
def test_what_is_not_served_is_a_400_that_says_what_to_do(client, call, message: str) -> None:  # noqa: ANN001
    with pytest.raises(InferenceServerException, match=message) as refused:
        call(client)
    assert refused.value.status() == "400"


def test_shared_memory_cleanup_calls_succeed(client) -> None:  # noqa: ANN001
    """Triton's examples unregister every region before they start: nothing is registered, nothing to undo."""
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory()
    assert client.get_system_shared_memory_status() == []
    assert client.get_cuda_shared_memory_status() == []


def test_tensors_in_shared_memory_are_refused_not_ignored(client) -> None:  # noqa: ANN001
    """An output asked into a region was answered in the body, the region left unwritten: the app read stale memory."""
    x, _ = _features(1)
    tensor = httpclient.InferInput("features", [1, 64], "FP32")
    tensor.set_data_from_numpy(x)
    output = httpclient.InferRequestedOutput("logits")
    output.set_shared_memory("out0", 40)
    with pytest.raises(InferenceServerException, match="output 'logits': shared memory is not supported") as refused:
        client.infer("mlp", [tensor], outputs=[output])
    assert refused.value.status() == "400"
    tensor.set_shared_memory("in0", 256)
    with pytest.raises(InferenceServerException, match="input 'features': shared memory is not supported"):
        client.infer("mlp", [tensor])


def test_bf16_is_described_as_bf16_and_refused_with_the_reason(client, server: str) -> None:  # noqa: ANN001
    metadata = client.get_model_metadata("bf16")
    assert metadata["inputs"] == [{"name": "x", "datatype": "BF16", "shape": [-1, 3]}]
    assert client.get_model_config("bf16")["input"] == [{"name": "x", "data_type": "TYPE_BF16", "dims": [3]}]
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "BF16", "data": [1, 2, 3]}]}
    response = httpx.post(f"http://{server}/v2/models/bf16/infer", json=body)
    assert response.status_code == 400 and "BF16 tensors are not supported" in response.json()["error"]


def test_the_aio_client(server: str) -> None:
    x, logits = _features(2)

    async def main() -> None:
        client = aioclient.InferenceServerClient(server)
        try:
            tensor = aioclient.InferInput("features", [2, 64], "FP32")
            tensor.set_data_from_numpy(x)
            result = await client.infer("mlp", [tensor], outputs=[
                aioclient.InferRequestedOutput("logits", class_count=2)], request_id="r1",
                request_compression_algorithm="gzip", response_compression_algorithm="deflate")
            assert result.get_response()["id"] == "r1"
            assert [[v.decode() for v in row] for row in result.as_numpy("logits")] == _expected_top(logits, 2)
            assert {m["name"] for m in await client.get_model_repository_index()} == set(MODELS)
            with pytest.raises(InferenceServerException, match="statistics extension is not supported"):
                await client.get_inference_statistics("mlp")
        finally:
            await client.close()

    asyncio.run(main())

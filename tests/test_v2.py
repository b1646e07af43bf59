"""/v2 (Open Inference Protocol) driven by the real tritonclient against the server on 127.0.0.1.

No worker runs (jobs stay queued), so the validated original serves: answers must equal ONNX
Runtime run directly on the same file.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from app.errors import BadRequestError
from app.protocol.v2_codec import decode_request
from optimizer.runtime import create_session
from tests import models
from tests.service import serving_models

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODELS = {"mlp": models.mlp(), "encoder": models.transformer(), "typed": models.typed_io()}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - yields "127.0.0.1:port"
    # The MLP's own batch size: batched without the timing probe, which a loaded machine can tip to "no batching"
    # (its first run over 10 ms), and test_batching_reaches_the_metrics would find no batch.
    uploads = {name: (model, {"batch_max_size": "32"} if name == "mlp" else {}) for name, model in MODELS.items()}
    with serving_models(tmp_path_factory.mktemp("v2"), uploads) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: str):  # noqa: ANN201
    client = httpclient.InferenceServerClient(server, concurrency=4)
    yield client
    client.close()


def _reference(name: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return create_session(MODELS[name].SerializeToString()).run(None, feed)


def _infer(client, name: str, feed: dict[str, np.ndarray], outputs: list[str], binary: bool,  # noqa: ANN001
           version: str = "") -> list[np.ndarray]:
    inputs = []
    for key, array in feed.items():
        datatype = "BYTES" if array.dtype == object else None
        tensor = httpclient.InferInput(key, list(array.shape), datatype or _dtype(array))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    requested = [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
    result = client.infer(name, inputs, model_version=version, outputs=requested, request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    return [result.as_numpy(o) for o in outputs]


def _dtype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def test_health_and_server_metadata(client) -> None:  # noqa: ANN001
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert "binary_tensor_data" in metadata["extensions"]
    assert metadata["name"] == "onnxforge"


def test_model_metadata_and_readiness(client) -> None:  # noqa: ANN001
    metadata = client.get_model_metadata("encoder")
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [
        {"name": "hidden_states", "datatype": "FP32", "shape": [-1, -1, 64]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
    ]
    assert metadata["outputs"][0]["name"] == "last_hidden_state"
    assert client.get_model_metadata("typed", model_version="1")["inputs"][3] == {
        "name": "text", "datatype": "BYTES", "shape": [-1]}
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", model_version="1")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("mlp", model_version="9")
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_model_metadata("nope")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_onnx_runtime(client, binary: bool) -> None:  # noqa: ANN001
    feed = models.random_feed(MODELS["encoder"], batch=2, seq=5)
    feed["attention_mask"][1, 3:] = 0
    (got,) = _infer(client, "encoder", feed, ["last_hidden_state"], binary)
    np.testing.assert_allclose(got, _reference("encoder", feed)[0], rtol=1e-5, atol=1e-5)
    feed = models.random_feed(MODELS["mlp"], batch=3)
    (got,) = _infer(client, "mlp", feed, ["logits"], binary, version="1")
    np.testing.assert_allclose(got, _reference("mlp", feed)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp16_bool_uint8_and_bytes(client, binary: bool) -> None:  # noqa: ANN001
    rng = np.random.default_rng(0)
    feed = {
        "half": rng.normal(0, 3, (2, 4)).astype(np.float16),
        "flag": rng.random((2, 4)) > 0.5,
        "small": rng.integers(0, 256, (2, 4)).astype(np.uint8),
        "text": np.array(["héllo", ""], dtype=object),
    }
    outputs = ["half_twice", "flag_not", "small_same", "text_same"]
    got = _infer(client, "typed", feed, outputs, binary)
    expected = _reference("typed", feed)
    for name, g, e in zip(outputs[:3], got[:3], expected[:3], strict=True):
        assert g.dtype == e.dtype, name
        np.testing.assert_array_equal(g, e)
    # tritonclient hands BYTES back as bytes objects.
    assert [v.decode() if isinstance(v, bytes) else v for v in got[3]] == ["héllo", ""]


def test_all_outputs_in_binary_when_none_are_named(client) -> None:  # noqa: ANN001
    feed = models.random_feed(MODELS["mlp"], batch=1)
    tensor = httpclient.InferInput("features", [1, 64], "FP32")
    tensor.set_data_from_numpy(feed["features"])
    result = client.infer("mlp", [tensor])
    output = result.get_output("logits")
    assert output["parameters"]["binary_data_size"] == 40
    np.testing.assert_allclose(result.as_numpy("logits"), _reference("mlp", feed)[0], rtol=1e-5, atol=1e-6)


def test_bad_requests_are_400_with_the_reason(client, server: str) -> None:  # noqa: ANN001
    tensor = httpclient.InferInput("features", [1, 64], "FP64")
    tensor.set_data_from_numpy(np.zeros((1, 64)))
    with pytest.raises(InferenceServerException, match="expects float32"):
        client.infer("mlp", [tensor])
    url = f"http://{server}/v2/models/mlp/infer"
    # No Content-Type at all (as some clients send), binary tensor after the JSON header.
    header = json.dumps({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    data = np.ones((1, 64), np.float32).tobytes()
    ok = httpx.post(url, content=header + data, headers={"Inference-Header-Content-Length": str(len(header))})
    assert ok.status_code == 200, ok.text
    assert ok.headers.get("content-type") == "application/json"
    np.testing.assert_allclose(ok.json()["outputs"][0]["data"],
                               _reference("mlp", {"features": np.ones((1, 64), np.float32)})[0].ravel(), rtol=1e-5)
    short = httpx.post(url, content=header + data[:100], headers={"Inference-Header-Content-Length": str(len(header))})
    assert short.status_code == 400 and "binary_data_size 256 runs past the 100 bytes" in short.json()["error"]
    broken = httpx.post(url, content=b"{not json")
    assert broken.status_code == 400 and "does not parse" in broken.json()["error"]
    missing = httpx.post(f"http://{server}/v2/models/nope/infer", content=b'{"inputs": []}')
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


def test_compressed_bodies_the_version_route_and_its_metrics_label(server: str) -> None:
    import gzip
    import zlib

    feed = {"features": np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)}
    body = json.dumps({"inputs": [{"name": "features", "shape": [2, 64], "datatype": "FP32",
                                   "data": feed["features"].ravel().tolist()}]}).encode()
    expected = _reference("mlp", feed)[0]
    for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)), ("identity", body)):
        response = httpx.post(f"http://{server}/v2/models/mlp/versions/1/infer", content=data,
                              headers={"Content-Encoding": encoding, "Content-Type": "application/json"})
        assert response.status_code == 200, response.text
        out = response.json()["outputs"][0]
        assert out["shape"] == [2, 10] and response.json()["model_version"] == "1"
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(2, 10), expected, rtol=1e-5, atol=1e-6)
    refused = httpx.post(f"http://{server}/v2/models/mlp/infer", content=body, headers={"Content-Encoding": "br"})
    assert refused.status_code == 400 and "'br' is not supported" in refused.json()["error"]
    corrupt = httpx.post(f"http://{server}/v2/models/mlp/infer", content=b"nope", headers={"Content-Encoding": "gzip"})
    assert corrupt.status_code == 400 and "not valid gzip" in corrupt.json()["error"]
    text = httpx.get(f"http://{server}/metrics").text
    label = ('onnxforge_http_requests_total{method="POST",route="/v2/models/{name}/versions/{version}/infer",'
             'status="200"}')
    counted = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(label)]
    assert counted and counted[0] >= 3


def test_batching_reaches_the_metrics(client, server: str) -> None:  # noqa: ANN001
    feed = models.random_feed(MODELS["mlp"], batch=1)
    tensor = httpclient.InferInput("features", [1, 64], "FP32")
    tensor.set_data_from_numpy(feed["features"])
    pending = [client.async_infer("mlp", [tensor]) for _ in range(16)]
    expected = _reference("mlp", feed)[0]
    for request in pending:
        np.testing.assert_allclose(request.get_result().as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
    text = httpx.get(f"http://{server}/metrics").text
    counts = [line for line in text.splitlines() if line.startswith("onnxforge_batch_size_sum{model=\"mlp\"")]
    assert counts and float(counts[0].split()[-1]) >= 16
    assert 'onnxforge_http_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"}' in text


@pytest.mark.parametrize(("body", "message"), [
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}]}', "needs 2 elements"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "BF16", "data": [1, 2]}]}',
     "BF16 tensors are not supported"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]}', "outside the range of INT8"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1.5]}]}', "must be integers"),
    (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": []}]}', "non-negative integers"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}', "must be strings"),
    # Not objects where the spec has objects: a 400 that says so, not a 500 from deep inside the decoder.
    (b'{"inputs": [], "parameters": "x"}', "the request: `parameters` must be an object, got str"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "parameters": 3}]}',
     "input 'x': `parameters` must be an object"),
    (b'{"inputs": [], "outputs": [{"name": "y", "parameters": []}]}', "output 'y': `parameters` must be an object"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": ["FP32"], "data": [1]}]}', "datatype \\['FP32'\\]"),
])
def test_codec_refusals_name_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError, match=message):
        decode_request(body, None)


def test_codec_bytes_length_prefixes() -> None:
    head = b'{"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 11}}]}'
    raw = b"\x02\x00\x00\x00hi\x01\x00\x00\x00!"
    request = decode_request(head + raw, str(len(head)))
    assert request.inputs["t"].tolist() == ["hi", "!"]
    bad = head.replace(b"11}", b"10}")
    with pytest.raises(BadRequestError, match="runs past"):
        decode_request(bad + raw[:10], str(len(bad)))
    with pytest.raises(BadRequestError, match="belong to no input"):
        decode_request(head + raw + b"x", str(len(head)))
    assert isinstance(decode_request(b'{"inputs": []}', None).inputs, dict)


def test_codec_a_header_seen_before_decodes_as_the_first_time() -> None:
    """decode_request keeps the plan of a binary header it has parsed (app/protocol/v2_codec.py): a request
    with the same header must get what the long way gives, and its refusals too."""
    head = json.dumps({"id": "r1", "inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": 24}},
        {"name": "n", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": 16}},
        {"name": "e", "shape": [0, 3], "datatype": "FP16", "parameters": {"binary_data_size": 0}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}]}).encode()
    for seed in range(3):  # the first parses, the others replay
        rng = np.random.default_rng(seed)
        x, n = rng.random((2, 3), dtype=np.float32), rng.integers(-9, 9, 2).astype(np.int64)
        request = decode_request(head + x.tobytes() + n.tobytes(), str(len(head)))
        assert request.inputs["x"].dtype == np.float32 and np.array_equal(request.inputs["x"], x)
        assert request.inputs["n"].dtype == np.int64 and np.array_equal(request.inputs["n"], n)
        assert request.inputs["e"].shape == (0, 3) and request.inputs["e"].dtype == np.float16
        assert (request.id, request.outputs, request.binary_outputs, request.binary_default) == \
            ("r1", ["y", "z"], {"y"}, False)
        request.outputs.append("w")  # a caller that changes its request changes no later one's
        request.binary_outputs.add("z")
    raw = x.tobytes() + n.tobytes()
    with pytest.raises(BadRequestError, match="belong to no input"):
        decode_request(head + raw + b"x", str(len(head)))
    with pytest.raises(BadRequestError, match="runs past"):
        decode_request(head + raw[:-1], str(len(head)))
    with pytest.raises(BadRequestError, match="outside the body"):
        decode_request(head[:-1], str(len(head)))


def test_codec_an_answer_header_seen_before_encodes_as_the_first_time() -> None:
    """encode_response keeps the JSON header of all-binary answers (app/protocol/v2_codec.py): the same bytes
    as the first time, and a new header when a shape, dtype, id or version differs."""
    from app.protocol.v2_codec import InferRequest, encode_response

    def answer(rows: int, dtype: type, id_: str | None = "a", version: int = 1) -> tuple[dict, bytes]:
        outputs = {"y": np.arange(rows * 3, dtype=dtype).reshape(rows, 3), "n": np.arange(rows, dtype=np.int64)}
        body, length = encode_response("m", version, InferRequest({}, id=id_, binary_default=True), outputs)
        head = json.loads(body[:length])
        blobs = b"".join(o.tobytes() for o in outputs.values())
        assert body[length:] == blobs
        return head, body

    first = answer(2, np.float32)
    assert answer(2, np.float32) == first
    assert first[0] == {"model_name": "m", "model_version": "1", "id": "a", "outputs": [
        {"name": "y", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
        {"name": "n", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}}]}
    head = answer(5, np.float16)[0]
    assert [(o["datatype"], o["shape"], o["parameters"]["binary_data_size"]) for o in head["outputs"]] == \
        [("FP16", [5, 3], 30), ("INT64", [5], 40)]
    assert "id" not in answer(2, np.float32, id_=None)[0]
    assert answer(2, np.float32, version=7)[0]["model_version"] == "7"

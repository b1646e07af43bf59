"""The fast path (app/fastpath.py) through the real app, for /v2 infer and /v1 predict: every rule the middleware
stack applied to such a request still holds, answers equal the normal stack's, and the server keeps answering
after errors.

The normal stack is the same app with CORS origins set (the fast path is off then): each request is sent to
both, and status, body and the headers that matter must agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper

from app.main import create_app
from app.security import body_limit_message
from app.settings import Settings
from optimizer.runtime import create_session
from tests import models
from tests.conftest import TEST_SETTINGS

READ_KEY = "read-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
LIMIT = 20_000
MLP = models.mlp()


def _auth(key: str = READ_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _reshapes_to_fours() -> onnx.ModelProto:
    """x [batch, 6] -> Reshape [-1, 4]: passes every declared check, but ONNX Runtime refuses an odd batch
    inside session.run (6 values do not make rows of 4)."""
    shape = onnx.numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 4])], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    return model


def _app(root: Path, **overrides: str | int) -> TestClient:
    settings = Settings(**{**TEST_SETTINGS, "data_dir": root, "run_worker": False,
                           "api_keys": f"admin:{ADMIN_KEY}, read:{READ_KEY}", "max_predict_body_bytes": LIMIT,
                           **overrides})
    return TestClient(create_app(settings), raise_server_exceptions=False)


def _upload(client: TestClient, name: str, model: onnx.ModelProto, **fields: str) -> None:
    response = client.post("/v1/models", files={"file": (f"{name}.onnx", model.SerializeToString())},
                           data={"name": name, **fields}, headers=_auth(ADMIN_KEY))
    assert response.status_code == 202, response.text


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, TestClient]]:
    """(fast, normal): the same models and keys; `normal` has CORS origins set, which keeps the fast path off."""
    root = tmp_path_factory.mktemp("fastpath")
    with _app(root / "fast") as fast, _app(root / "normal", cors_origins="https://ui.example") as normal:
        assert fast.app.fast_infer is not None and normal.app.fast_infer is None
        for client in (fast, normal):
            _upload(client, "good", MLP)
            _upload(client, "reshape", _reshapes_to_fours(), batch_max_size="1")
            _upload(client, "reshape_batched", _reshapes_to_fours(), batch_max_size="4")
        yield fast, normal


def _binary(feed: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": k, "shape": list(v.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": v.nbytes}} for k, v in feed.items()],
                         "parameters": {"binary_data_output": True}}).encode()
    body = header + b"".join(v.tobytes() for v in feed.values())
    return body, {"Inference-Header-Content-Length": str(len(header))}


def _http_count(client: TestClient, route: str, status: int) -> float:
    label = f'onnxforge_http_requests_total{{method="POST",route="{route}",status="{status}"}}'
    return sum(float(line.split()[-1]) for line in client.get("/metrics").text.splitlines() if line.startswith(label))


def _same_answer(apps: tuple[TestClient, TestClient], path: str, **request: object):  # noqa: ANN202 - httpx.Response
    """Send one request to both apps; status, body bytes and every header must agree (but `Vary: Origin`, which
    the normal app's CORS middleware adds)."""
    fast, normal = (client.post(path, **request) for client in apps)
    assert fast.status_code == normal.status_code, (fast.text, normal.text)
    assert dict(fast.headers) == {k: v for k, v in normal.headers.items() if (k, v) != ("vary", "Origin")}
    assert fast.content == normal.content
    return fast


def _json(feed: dict[str, np.ndarray], **fields: object) -> bytes:
    """A /v1 predict body."""
    return json.dumps({"inputs": {k: v.tolist() for k, v in feed.items()}, **fields}).encode()


def test_infer_answers_equal_onnx_runtime_and_the_normal_stack(apps) -> None:  # noqa: ANN001
    feed = models.random_feed(MLP, batch=3)
    body, headers = _binary(feed)
    expected = create_session(MLP.SerializeToString()).run(None, feed)[0]
    for path in ("/v2/models/good/infer", "/v2/models/good/versions/1/infer"):
        response = _same_answer(apps, path, content=body, headers={**headers, **_auth()})
        assert response.status_code == 200
        split = int(response.headers["inference-header-content-length"])
        assert json.loads(response.content[:split])["outputs"][0]["shape"] == [3, 10]
        got = np.frombuffer(response.content[split:], np.float32).reshape(3, 10)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_missing_or_wrong_key_is_401_and_a_read_or_admin_key_infers(apps) -> None:  # noqa: ANN001
    body, headers = _binary(models.random_feed(MLP, batch=1))
    for auth in ({}, _auth("wrong-key-0123456789abcdef"), {"Authorization": READ_KEY},
                 {"Authorization": f"Basic {READ_KEY}"}, _auth(READ_KEY[:-1]), {"Authorization": "Bearer "}):
        response = _same_answer(apps, "/v2/models/good/infer", content=body, headers={**headers, **auth})
        assert response.status_code == 401, (auth, response.text)
        assert response.json() == {"error": "missing or invalid API key: send `Authorization: Bearer <key>`"}
        assert response.headers["www-authenticate"] == 'Bearer realm="onnxforge"'
    # An unknown model answers 401 too, before anything is looked up: no key, no information.
    response = _same_answer(apps, "/v2/models/nope/infer", content=body, headers=headers)
    assert response.status_code == 401
    for key in (READ_KEY, ADMIN_KEY):
        assert _same_answer(apps, "/v2/models/good/infer", content=body,
                            headers={**headers, **_auth(key)}).status_code == 200
    # What a read key may not do is still refused, by the normal stack (the fast path only infers).
    fast, _ = apps
    response = fast.delete("/v1/models/good", headers=_auth(READ_KEY))
    assert response.status_code == 403 and "read-only" in response.json()["error"]


def test_a_body_over_the_limit_is_413_by_content_length_and_while_streaming(apps) -> None:  # noqa: ANN001
    big = np.zeros((100, 64), np.float32)  # 25.6 kB of tensor, over the 20 kB limit
    body, headers = _binary({"features": big})
    response = _same_answer(apps, "/v2/models/good/infer", content=body, headers={**headers, **_auth()})
    assert response.status_code == 413 and "ONNXFORGE_MAX_PREDICT_BODY_BYTES" in response.json()["error"]
    assert f"limit of {LIMIT} bytes" in response.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds as the body streams in
        for _ in range(30):
            yield b" " * 1000
    for client in apps:
        response = client.post("/v2/models/good/infer", content=chunks(), headers=_auth())
        assert response.status_code == 413, response.text
        assert "ONNXFORGE_MAX_PREDICT_BODY_BYTES" in response.json()["error"]
    small, headers = _binary(models.random_feed(MLP, batch=1))
    assert _same_answer(apps, "/v2/models/good/infer", content=small, headers={**headers, **_auth()}).status_code == 200


def test_bad_tensors_unknown_models_and_versions_answer_in_the_one_error_shape(apps) -> None:  # noqa: ANN001
    wrong_type = json.dumps({"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP64",
                                         "data": [0.0] * 64}]}).encode()
    cases = [
        ("/v2/models/good/infer", wrong_type, 400, "expects float32"),
        ("/v2/models/good/infer", b"{not json", 400, "does not parse"),
        ("/v2/models/good/infer", b'{"inputs": [], "parameters": "x"}', 400, "`parameters` must be an object"),
        ("/v2/models/nope/infer", b'{"inputs": []}', 404, "'nope'"),
        ("/v2/models/good/versions/9/infer", b'{"inputs": []}', 404, "version"),
        ("/v2/models/good/versions/x/infer", b'{"inputs": []}', 404, "versions are numbers"),
    ]
    for path, body, status, message in cases:
        response = _same_answer(apps, path, content=body, headers=_auth())
        assert response.status_code == status, (path, response.text)
        assert list(response.json()) == ["error"] and message in response.json()["error"], response.text
    fast, _ = apps
    refused = fast.post("/v2/models/good/infer", content=b"{}", headers={**_auth(), "Content-Encoding": "br"})
    assert refused.status_code == 400 and "'br' is not supported" in refused.json()["error"]


def test_paths_that_are_not_infer_go_to_the_normal_stack(apps) -> None:  # noqa: ANN001
    fast, _ = apps
    for path in ("/v2/models//infer", "/v2/models/good/versions//infer", "/v2/models/good/extra/1/infer",
                 "/v1/models//predict", "/v1/models/good/versions//predict", "/v1/models/good/extra/1/predict"):
        response = _same_answer(apps, path, content=b"{}", headers=_auth())
        assert response.status_code == 404 and "no such route" in response.json()["error"], path
    for path in ("/v2/models/good/infer", "/v1/models/good/predict"):
        response = fast.get(path, headers=_auth())
        assert response.status_code == 405 and "not allowed" in response.json()["error"]


@pytest.mark.parametrize("name", ["reshape", "reshape_batched"])
def test_a_model_that_fails_inside_session_run_is_a_400_and_the_server_goes_on(apps, name: str) -> None:  # noqa: ANN001
    fast, _ = apps
    odd, headers = _binary({"x": np.ones((1, 6), np.float32)})
    even, _ = _binary({"x": np.arange(12, dtype=np.float32).reshape(2, 6)})
    for _ in range(3):
        response = _same_answer(apps, f"/v2/models/{name}/infer", content=odd, headers={**headers, **_auth()})
        assert response.status_code == 400, response.text
        assert "ONNX Runtime could not run model" in response.json()["error"]
        response = fast.post(f"/v2/models/{name}/infer", content=even, headers={**headers, **_auth()})
        assert response.status_code == 200, response.text
        split = int(response.headers["inference-header-content-length"])
        rows = np.frombuffer(response.content[split:], np.float32).reshape(3, 4)
        np.testing.assert_array_equal(rows.ravel(), np.arange(12, dtype=np.float32))
        response = _same_answer(apps, f"/v1/models/{name}/predict", content=_json({"x": np.ones((1, 6))}),
                                headers=_auth())
        assert response.status_code == 400 and "ONNX Runtime could not run model" in response.json()["error"]
        response = _same_answer(apps, f"/v1/models/{name}/predict", content=_json({"x": np.arange(12.0).reshape(2, 6)}),
                                headers=_auth())
        assert response.status_code == 200, response.text
        assert response.json()["outputs"]["y"] == np.arange(12.0).reshape(3, 4).tolist()


@pytest.mark.parametrize("stack", ["fast", "normal"])
def test_every_answer_is_counted_under_the_route_template(apps, stack: str) -> None:  # noqa: ANN001
    """Both stacks count every answer with its real status, refusals by the key check and body limit included."""
    client = apps[0] if stack == "fast" else apps[1]
    body, headers = _binary(models.random_feed(MLP, batch=1))
    plain, versioned = "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"
    predict, version_predict = "/v1/models/{name}/predict", "/v1/models/{name}/versions/{version}/predict"
    routes, statuses = (plain, versioned, predict, version_predict), (200, 401, 404, 409, 413, 422, 500)
    before = {(route, status): _http_count(client, route, status) for route in routes for status in statuses}
    for _ in range(3):
        assert client.post("/v2/models/good/infer", content=body, headers={**headers, **_auth()}).status_code == 200
    assert client.post("/v2/models/good/versions/1/infer", content=body,
                       headers={**headers, **_auth()}).status_code == 200
    assert client.post("/v2/models/good/infer", content=body, headers=headers).status_code == 401
    assert client.post("/v2/models/nope/infer", content=body, headers={**headers, **_auth()}).status_code == 404
    big, big_headers = _binary({"features": np.zeros((100, 64), np.float32)})
    assert client.post("/v2/models/good/infer", content=big, headers={**big_headers, **_auth()}).status_code == 413
    streamed = client.post("/v2/models/good/versions/1/infer", content=iter([big[:1000], big[1000:]]),
                           headers={**big_headers, **_auth()})  # chunked: no Content-Length, over the limit
    assert streamed.status_code == 413, streamed.text

    feed = _json(models.random_feed(MLP, batch=1))
    for _ in range(2):
        assert client.post("/v1/models/good/predict", content=feed, headers=_auth()).status_code == 200
    assert client.post("/v1/models/good/versions/1/predict", content=feed, headers=_auth()).status_code == 200
    assert client.post("/v1/models/good/predict", content=feed).status_code == 401
    assert client.post("/v1/models/good/versions/7/predict", content=feed, headers=_auth()).status_code == 404
    assert client.post("/v1/models/good/predict", content=_json(models.random_feed(MLP, batch=1), variant="optimized"),
                       headers=_auth()).status_code == 409
    assert client.post("/v1/models/good/predict", content=b"{", headers=_auth()).status_code == 422
    big = _json({"features": np.zeros((100, 64))})
    assert client.post("/v1/models/good/predict", content=big, headers=_auth()).status_code == 413
    streamed = client.post("/v1/models/good/versions/1/predict", content=iter([big[:1000], big[1000:]]),
                           headers=_auth())
    assert streamed.status_code == 413, streamed.text
    after = {key: _http_count(client, *key) for key in before}
    assert {key: after[key] - before[key] for key in before if after[key] != before[key]} == {
        (plain, 200): 3, (plain, 401): 1, (plain, 404): 1, (plain, 413): 1, (versioned, 200): 1, (versioned, 413): 1,
        (predict, 200): 2, (predict, 401): 1, (predict, 409): 1, (predict, 413): 1, (predict, 422): 1,
        (version_predict, 200): 1, (version_predict, 404): 1, (version_predict, 413): 1,
    }


@pytest.mark.parametrize("path", ["/v2/models/good/infer", "/v1/models/good/predict"])
def test_an_unexpected_error_is_a_500_in_the_one_shape_and_the_server_goes_on(apps, path: str) -> None:  # noqa: ANN001
    """The server's `receive` itself failing (a broken connection): no handler of ours expects it."""
    fast, _ = apps
    app = fast.app
    sent: list[dict] = []

    async def receive() -> dict:
        raise RuntimeError("the connection broke")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "",
             "headers": [(b"authorization", f"Bearer {READ_KEY}".encode())], "query_string": b""}
    fast.portal.call(app, scope, receive, send)
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {
        "error": "internal error (RuntimeError); the server log has the details"}
    body, headers = _binary(models.random_feed(MLP, batch=1))
    assert fast.post("/v2/models/good/infer", content=body, headers={**headers, **_auth()}).status_code == 200
    assert fast.post("/v1/models/good/predict", content=_json(models.random_feed(MLP, batch=1)),
                     headers=_auth()).status_code == 200


@pytest.mark.parametrize(("path", "body"), [("/v2/models/good/infer", b'{"inputs": []}'),
                                            ("/v1/models/good/predict", b'{"inputs": {}}'),
                                            ("/v1/models/good/versions/1/predict", b'{"inputs": {}}')])
def test_before_the_lifespan_has_started_predict_is_503(tmp_path: Path, path: str, body: bytes) -> None:
    for cors in ("", "https://ui.example"):  # the fast path, then the normal stack
        app = create_app(Settings(**{**TEST_SETTINGS, "data_dir": tmp_path, "run_worker": False, "cors_origins": cors}))
        assert (app.fast_infer is None) == bool(cors)
        client = TestClient(app)  # not entered: no lifespan, no services
        response = client.post(path, content=body)
        assert response.status_code == 503 and response.json() == {"error": "the service is starting or stopping"}


# -- /v1 predict (JSON) -----------------------------------------------------------------------------------


def test_predict_and_infer_are_answered_in_front_of_the_framework(apps) -> None:  # noqa: ANN001
    """Both stacks answer alike, so only this shows the fast path answered: the requests that reach FastAPI's
    middleware stack are recorded, and predict and infer requests (200s and errors) must not be among them."""
    fast, _ = apps
    app = fast.app
    stack = app.middleware_stack  # built by the fixture's first request
    reached: list[str] = []

    async def recording(scope, receive, send) -> None:  # noqa: ANN001
        reached.append(scope["path"])
        await stack(scope, receive, send)

    app.middleware_stack = recording
    try:
        body, headers = _binary(models.random_feed(MLP, batch=1))
        assert fast.post("/v2/models/good/infer", content=body, headers={**headers, **_auth()}).status_code == 200
        feed = _json(models.random_feed(MLP, batch=1))
        assert fast.post("/v1/models/good/predict", content=feed, headers=_auth()).status_code == 200
        assert fast.post("/v1/models/good/versions/1/predict", content=feed, headers=_auth()).status_code == 200
        assert fast.post("/v1/models/nope/predict", content=feed, headers=_auth()).status_code == 404
        assert fast.post("/v1/models/good/predict", content=feed).status_code == 401
        assert fast.get("/v1/models/good", headers=_auth()).status_code == 200
    finally:
        app.middleware_stack = stack
    assert reached == ["/v1/models/good"]


def test_predict_answers_equal_onnx_runtime_and_the_normal_stack(apps) -> None:  # noqa: ANN001
    feed = models.random_feed(MLP, batch=3)
    (expected,) = create_session(MLP.SerializeToString()).run(None, feed)
    for path in ("/v1/models/good/predict", "/v1/models/good/versions/1/predict"):
        for fields, headers in (({}, {}), ({"variant": "original"}, {}), ({"variant": None}, {}),
                                ({}, {"Content-Type": "text/plain"}),  # /v1 reads JSON whatever the type says
                                ({}, {"Content-Encoding": "gzip"})):  # and decompresses nothing (that is /v2's)
            response = _same_answer(apps, path, content=_json(feed, **fields), headers={**headers, **_auth()})
            assert response.status_code == 200, (path, fields, headers, response.text)
            assert response.headers["content-type"] == "application/json"
            answer = response.json()
            assert (answer["model"], answer["version"], answer["variant"]) == ("good", 1, "original")
            assert list(answer["outputs"]) == ["logits"]
            np.testing.assert_allclose(np.asarray(answer["outputs"]["logits"], np.float32), expected,
                                       rtol=1e-5, atol=1e-6)


def test_predict_without_a_valid_key_is_401_and_a_read_or_admin_key_predicts(apps) -> None:  # noqa: ANN001
    feed = _json(models.random_feed(MLP, batch=1))
    for path in ("/v1/models/good/predict", "/v1/models/good/versions/1/predict", "/v1/models/nope/predict"):
        for auth in ({}, _auth("wrong-key-0123456789abcdef"), {"Authorization": READ_KEY},
                     {"Authorization": f"Basic {READ_KEY}"}, _auth(READ_KEY[:-1]), {"Authorization": "Bearer "}):
            response = _same_answer(apps, path, content=feed, headers=auth)
            assert response.status_code == 401, (path, auth, response.text)
            assert response.json() == {"error": "missing or invalid API key: send `Authorization: Bearer <key>`"}
            assert response.headers["www-authenticate"] == 'Bearer realm="onnxforge"'
    # Predicting is what a read key is for (app.security.required_role): 200, not 403, on both stacks.
    for key in (READ_KEY, ADMIN_KEY):
        for path in ("/v1/models/good/predict", "/v1/models/good/versions/1/predict"):
            assert _same_answer(apps, path, content=feed, headers=_auth(key)).status_code == 200


def test_a_predict_body_over_the_limit_is_413_by_content_length_and_while_streaming(apps) -> None:  # noqa: ANN001
    big = _json({"features": np.zeros((100, 64))})  # 6400 values of "0.0, ": over the 20 kB limit
    assert len(big) > LIMIT
    for path in ("/v1/models/good/predict", "/v1/models/good/versions/1/predict"):
        response = _same_answer(apps, path, content=big, headers=_auth())
        assert response.status_code == 413, response.text
        assert response.json()["error"].startswith(f"the request body is larger than the predict limit of {LIMIT} ")

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds as the body streams in
            for start in range(0, len(big), 1000):
                yield big[start:start + 1000]
        answers = [client.post(path, content=chunks(), headers=_auth()) for client in apps]
        assert [a.status_code for a in answers] == [413, 413], [a.text for a in answers]
        assert answers[0].json() == answers[1].json() == response.json()
    # just under the limit is served
    rows = _json(models.random_feed(MLP, batch=8))
    assert len(rows) < LIMIT
    assert _same_answer(apps, "/v1/models/good/predict", content=rows, headers=_auth()).status_code == 200


@pytest.mark.parametrize("stack", ["fast", "normal"])
@pytest.mark.parametrize("path", ["/v2/models/good/infer", "/v1/models/good/predict"])
def test_a_content_length_over_the_limit_is_413_before_the_body_is_read(apps, stack: str, path: str) -> None:  # noqa: ANN001
    """A client announcing a huge body is refused at once: nothing of it is received (a server would otherwise
    buffer up to the limit first)."""
    client = apps[0] if stack == "fast" else apps[1]
    received, sent = [], []

    async def receive() -> dict:
        received.append(1)
        return {"type": "http.request", "body": b'{"inputs": {}}', "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": [(b"authorization", f"Bearer {READ_KEY}".encode()),
                                              (b"content-length", str(LIMIT + 1).encode())]}
    client.portal.call(client.app, scope, receive, send)
    assert sent[0]["status"] == 413 and received == []
    assert json.loads(sent[1]["body"]) == {"error": body_limit_message(LIMIT)}


_BAD_PREDICTS = [  # path, body, status, what the error says
    ("/v1/models/good/predict", {"inputs": {"feature": [[0.0] * 64]}}, 400, "'feature'"),
    ("/v1/models/good/predict", {"inputs": {"features": [[0.0] * 63]}}, 400, "axis 1 must be 64"),
    ("/v1/models/good/predict", {"inputs": {"features": [0.0] * 64}}, 400, "expects 2 dimensions"),
    ("/v1/models/good/predict", {"inputs": {"features": [["a"] * 64]}}, 400, "expects float32 numbers, got strings"),
    ("/v1/models/good/predict", {"inputs": {"features": [[None] * 64]}}, 400, "must hold numbers"),
    ("/v1/models/good/predict", {"inputs": {"features": [[0.0] * 64, [0.0]]}}, 400, "not a rectangular"),
    ("/v1/models/good/predict", {"inputs": {"features": [[1e39] * 64]}}, 400, "too large for float32"),
    ("/v1/models/nope/predict", {"inputs": {}}, 404, "no model 'nope'"),
    ("/v1/models/good/versions/9/predict", {"inputs": {}}, 404, "model 'good' has no version 9"),
    ("/v1/models/good/versions/x/predict", {"inputs": {}}, 404, "versions are numbers"),
    ("/v1/models/good/versions/x/predict", b"{not json", 404, "versions are numbers"),  # the version first
    ("/v1/models/good/versions/¹/predict", {"inputs": {}}, 404, "versions are numbers"),
    ("/v1/models/good/predict", {"inputs": {"features": [[0.0] * 64]}, "variant": "optimized"}, 409,
     "still optimizing"),
    ("/v1/models/good/predict", b"{not json", 422, "not valid JSON"),
    ("/v1/models/good/predict", b"", 422, "not valid JSON"),
    ("/v1/models/good/predict", b"\xff\xfe", 422, "not valid JSON"),
    ("/v1/models/good/predict", b"[1, 2]", 422, "must be a JSON object"),
    ("/v1/models/good/predict", {"variant": "original"}, 422, "inputs: Field required"),
    ("/v1/models/good/predict", {"inputs": [[0.0] * 64]}, 422, "inputs: Input should be an object"),
    ("/v1/models/good/versions/1/predict", {"inputs": {}, "variant": "fast"}, 422, "variant: Input should be"),
    ("/v1/models/good/predict", {"inputs": {}, "variant": 3}, 422, "variant: Input should be"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), _BAD_PREDICTS)
def test_bad_predicts_answer_in_the_one_error_shape(apps, path: str, body: object, status: int,  # noqa: ANN001
                                                   message: str) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = _same_answer(apps, path, content=content, headers=_auth())
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"] and message in response.json()["error"], response.text
    fast, _ = apps  # and the fast path goes on serving
    assert fast.post("/v1/models/good/predict", content=_json(models.random_feed(MLP, batch=1)),
                     headers=_auth()).status_code == 200

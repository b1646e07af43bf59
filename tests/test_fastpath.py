"""The fast infer path (app/fastpath.py) through the real app: every rule the middleware stack applied to an
infer request still holds, answers equal the normal stack's, and the server keeps answering after errors.

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
    """Send one request to both apps; status, JSON body and the headers that matter must agree."""
    fast, normal = (client.post(path, **request) for client in apps)
    assert fast.status_code == normal.status_code, (fast.text, normal.text)
    assert fast.headers.get("content-type") == normal.headers.get("content-type")
    assert fast.headers.get("www-authenticate") == normal.headers.get("www-authenticate")
    if fast.headers.get("content-type") == "application/json":
        assert fast.json() == normal.json()
    else:
        assert fast.content == normal.content
    return fast


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
    for path in ("/v2/models//infer", "/v2/models/good/versions//infer", "/v2/models/good/extra/1/infer"):
        response = fast.post(path, content=b"{}", headers=_auth())
        assert response.status_code == 404 and "no such route" in response.json()["error"], path
    response = fast.get("/v2/models/good/infer", headers=_auth())
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


@pytest.mark.parametrize("stack", ["fast", "normal"])
def test_every_answer_is_counted_under_the_route_template(apps, stack: str) -> None:  # noqa: ANN001
    """Both stacks count every answer with its real status, refusals by the key check and body limit included."""
    client = apps[0] if stack == "fast" else apps[1]
    body, headers = _binary(models.random_feed(MLP, batch=1))
    plain, versioned = "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"
    before = {(route, status): _http_count(client, route, status)
              for route in (plain, versioned) for status in (200, 401, 404, 413, 500)}
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
    after = {key: _http_count(client, *key) for key in before}
    assert {key: after[key] - before[key] for key in before if after[key] != before[key]} == {
        (plain, 200): 3, (plain, 401): 1, (plain, 404): 1, (plain, 413): 1, (versioned, 200): 1, (versioned, 413): 1,
    }


def test_an_unexpected_error_is_a_500_in_the_one_shape_and_the_server_goes_on(apps) -> None:  # noqa: ANN001
    """The server's `receive` itself failing (a broken connection): no handler of ours expects it."""
    fast, _ = apps
    app = fast.app
    sent: list[dict] = []

    async def receive() -> dict:
        raise RuntimeError("the connection broke")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v2/models/good/infer", "root_path": "",
             "headers": [(b"authorization", f"Bearer {READ_KEY}".encode())], "query_string": b""}
    fast.portal.call(app, scope, receive, send)
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {
        "error": "internal error (RuntimeError); the server log has the details"}
    body, headers = _binary(models.random_feed(MLP, batch=1))
    assert fast.post("/v2/models/good/infer", content=body, headers={**headers, **_auth()}).status_code == 200


def test_before_the_lifespan_has_started_infer_is_503(tmp_path: Path) -> None:
    app = create_app(Settings(**{**TEST_SETTINGS, "data_dir": tmp_path, "run_worker": False}))
    client = TestClient(app)  # not entered: no lifespan, no services
    response = client.post("/v2/models/good/infer", content=b'{"inputs": []}')
    assert response.status_code == 503 and response.json() == {"error": "the service is starting or stopping"}

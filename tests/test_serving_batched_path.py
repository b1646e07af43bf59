"""The short path's batched requests (app/http_protocol.py `_Request.start`): a /v2 infer request of a model whose
requests are batched joins its batch queue from the parser's callback and is answered from its batch's callback,
without a task; over real sockets to uvicorn (in this process, a thread), the answers, errors and counts are those of
the ASGI path, a client gone while its request waits in the queue gets 499 and its request is not run, and a request
the graceful drain did not finish gets the 503.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from app import http_protocol
from app.main import create_app
from app.settings import Settings
from optimizer.runtime import create_session
from tests import models
from tests.conftest import TEST_SETTINGS
from tests.service import free_port
from tests.test_robust_disconnect import _until, uvicorn_in_thread
from tests.test_serving_protocol_path import BAD_TENSOR, BINARY_HEADERS, FEED, V2_BINARY, V2_JSON, _exchange, _Reader

LIMIT_S = 3.0
# The short way is for a model whose version lookup is fresh (PredictService._hot_route): the tests' TTL of 0 never is.
CACHED = {"registry_cache_ttl_s": 600.0}


def slow_rows() -> onnx.ModelProto:
    """A batchable model as slow as the client asks: y = tanh(x W) max(trips) times (a Loop), rows of any count."""
    weights = (np.random.default_rng(0).standard_normal((64, 64)) * 0.05).astype(np.float32)
    body = h.make_graph(
        [h.make_node("MatMul", ["x_in", "w"], ["x_mm"]), h.make_node("Tanh", ["x_mm"], ["x_out"]),
         h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("x_in", T.FLOAT, ["rows", 64])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("x_out", T.FLOAT, ["rows", 64])],
        [h.make_tensor("w", T.FLOAT, [64, 64], weights.ravel().tolist())],
    )
    graph = h.make_graph(
        [h.make_node("Constant", [], ["cond"], value=h.make_tensor("c", T.BOOL, [], [True])),
         h.make_node("ReduceMax", ["trips"], ["trip"], keepdims=0),
         h.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body)],
        "slowrows",
        [h.make_tensor_value_info("trips", T.INT64, ["batch", 1]),
         h.make_tensor_value_info("x", T.FLOAT, ["batch", 64])],
        [h.make_tensor_value_info("y", T.FLOAT, ["batch", 64])],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _slow(trips: int) -> bytes:
    return json.dumps({"inputs": [{"name": "trips", "shape": [1, 1], "datatype": "INT64", "data": [trips]},
                                  {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.1] * 64}]}).encode()


def _request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {"Content-Type": "application/json"}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _send(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(request)
    return sock


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, object, list[str]]]:
    """(port, the app, the paths `_Request.answer` ran for): uvicorn with the service's protocol, "mlp" and "slow"
    uploaded with batch_max_size=32 (always batched, no probe)."""
    answered: list[str] = []
    answer = http_protocol._Request.answer

    async def witness(self: http_protocol._Request, *args: object) -> None:
        answered.append(self.path)
        await answer(self, *args)

    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path_factory.mktemp("batched") / "data",
                           "run_worker": False, "predict_time_limit_s": LIMIT_S, **CACHED})
    app = create_app(settings)
    port = free_port()
    http_protocol._Request.answer = witness  # a witness of which requests take a task, not a stand-in: it calls it
    try:
        with uvicorn_in_thread(app, port) as base:
            for name, model in (("mlp", models.mlp()), ("slow", slow_rows())):
                response = httpx.post(f"{base}/v1/models", files={"file": (f"{name}.onnx", model.SerializeToString())},
                                      data={"name": name, "batch_max_size": "32"}, timeout=60)
                assert response.status_code == 202, response.text
                assert httpx.get(f"{base}/v2/models/{name}/ready", timeout=30).status_code == 200
            # a model's first predict builds its route (the long way, in a task); the next take the short way
            assert _exchange(port, _request("/v2/models/mlp/infer", V2_JSON))[0][0] == 200
            assert _exchange(port, _request("/v2/models/mlp/versions/1/infer", V2_JSON))[0][0] == 200
            assert _exchange(port, _request("/v2/models/slow/infer", _slow(1)))[0][0] == 200
            yield port, app, answered
    finally:
        http_protocol._Request.answer = answer


def _counts(port: int) -> dict[str, float]:
    """The /metrics lines of the v2 infer route's HTTP counts and of the predict counts, by their labels."""
    counts = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        if line.startswith(("onnxforge_http_requests_total{method=\"POST\"", "onnxforge_predict_requests_total{")):
            labels, value = line.rsplit(" ", 1)
            counts[labels] = float(value)
    return counts


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


HTTP = 'onnxforge_http_requests_total{method="POST",route="/v2/models/{name}/infer",status="%s"}'
PREDICT = 'onnxforge_predict_requests_total{model="%s",outcome="%s",variant="original",version="1"}'
NAMED = json.dumps({"inputs": [{"name": "features", "shape": [3, 64], "datatype": "FP32",
                                "data": FEED.ravel().tolist()}],
                    "outputs": [{"name": "logits"}], "id": "r1"}).encode()
UNKNOWN_OUTPUT = json.dumps({"inputs": [{"name": "features", "shape": [3, 64], "datatype": "FP32",
                                         "data": FEED.ravel().tolist()}], "outputs": [{"name": "nope"}]}).encode()
CASES = {
    "binary": ("/v2/models/mlp/infer", V2_BINARY, BINARY_HEADERS, 200, "ok"),
    "json": ("/v2/models/mlp/infer", V2_JSON, None, 200, "ok"),
    "output by name, an id": ("/v2/models/mlp/infer", NAMED, None, 200, "ok"),
    "versioned": ("/v2/models/mlp/versions/1/infer", V2_BINARY, BINARY_HEADERS, 200, "ok"),
    "bad tensor": ("/v2/models/mlp/infer", BAD_TENSOR, None, 400, "rejected"),
    "unknown output": ("/v2/models/mlp/infer", UNKNOWN_OUTPUT, None, 400, "rejected"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_requests_take_no_task_and_answer_as_the_asgi_path(server: tuple[int, object, list[str]],
                                                                   case: str) -> None:
    """Same status, headers and body as the ASGI fast path (a trailing slash takes uvicorn's cycle), each counted
    once in the HTTP and predict counts, and none of them through a task."""
    port, _, answered = server
    path, body, headers, status, outcome = CASES[case]
    answered.clear()
    before = _counts(port)
    short, asgi = _exchange(port, _request(path, body, headers), _request(path + "/", body, headers))
    assert short[0] == status, short[2]
    assert answered == [], "a batched request took a task"

    def without_date(head: bytes) -> list[bytes]:
        return [line for line in head.split(b"\r\n") if not line.startswith(b"date: ")]

    assert (without_date(short[3]), short[2]) == (without_date(asgi[3]), asgi[2])
    if status == 200:
        length = int(short[1].get("inference-header-content-length", len(short[2])))
        head = json.loads(short[2][:length])
        logits = (np.frombuffer(short[2][length:], np.float32) if length < len(short[2])
                  else np.asarray(head["outputs"][0]["data"], np.float32)).reshape(3, 10)
        expected = create_session(models.mlp().SerializeToString()).run(None, {"features": FEED})[0]
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    http = (HTTP % status).replace("{name}/infer", "{name}/versions/{version}/infer") if "versions" in path \
        else HTTP % status
    assert _delta(before, _counts(port)) == {http: 2.0, PREDICT % ("mlp", outcome): 2.0}


def test_many_at_once_share_runs_and_each_gets_its_own_rows(server: tuple[int, object, list[str]]) -> None:
    port, _, answered = server
    rng = np.random.default_rng(1)
    feeds = [rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(24)]
    session = create_session(models.mlp().SerializeToString())
    answered.clear()
    socks = []
    for feed in feeds:
        header = json.dumps({"inputs": [{"name": "features", "shape": list(feed.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": feed.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        socks.append(_send(port, _request("/v2/models/mlp/infer", header + feed.tobytes(),
                                          {"Inference-Header-Content-Length": str(len(header))})))
    for sock, feed in zip(socks, feeds, strict=True):
        with sock:
            status, headers, body, _ = _Reader(sock).answer()
        assert status == 200, body
        length = int(headers["inference-header-content-length"])
        np.testing.assert_allclose(np.frombuffer(body[length:], np.float32).reshape(len(feed), 10),
                                   session.run(None, {"features": feed})[0], rtol=1e-5, atol=1e-6)
    assert answered == []


def test_a_client_gone_while_queued_is_499_and_its_request_never_runs(server: tuple[int, object, list[str]]) -> None:
    """One slow request runs (up to the time limit, then 504); a second one waits in the batch queue for company
    (batching.py: a lone row beside a run in flight waits); its client goes away: counted 499 and rejected at once,
    and once the first run ends, it is not run."""
    port, app, _ = server
    watchdog = app.state.services.predict.watchdog
    before = _counts(port)
    first = _send(port, _request("/v2/models/slow/infer", _slow(10**9)))
    _until(lambda: watchdog.running() == 1, "the first slow run started")
    second = _send(port, _request("/v2/models/slow/infer", _slow(10**9)))
    time.sleep(0.3)  # read and queued
    assert watchdog.running() == 1, "the second request did not wait in the queue"
    second.close()
    _until(lambda: _delta(before, _counts(port)).get(HTTP % 499) == 1.0, "the gone client's request counted 499")
    assert _delta(before, _counts(port)).get(PREDICT % ("slow", "rejected")) == 1.0
    with first:
        status, _, body, _ = _Reader(first).answer()
    assert status == 504, body
    time.sleep(0.5)  # a run of the gone request would now be in ONNX Runtime, for up to LIMIT_S
    assert watchdog.running() == 0, "a gone client's request ran"
    assert _delta(before, _counts(port)) == {HTTP % 499: 1.0, HTTP % 504: 1.0, PREDICT % ("slow", "rejected"): 1.0,
                                             PREDICT % ("slow", "failed"): 1.0}


def test_the_drain_answers_a_batched_request_it_did_not_finish_with_503(tmp_path: object) -> None:
    """uvicorn's graceful drain (1 s here) waits for a batched request as for a task, then cancels it: 503."""
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "data", "run_worker": False,  # type: ignore[operator]
                           "predict_time_limit_s": 6, **CACHED})
    app = create_app(settings)
    port = free_port()
    with uvicorn_in_thread(app, port) as base:
        response = httpx.post(f"{base}/v1/models", files={"file": ("slow.onnx", slow_rows().SerializeToString())},
                              data={"name": "slow", "batch_max_size": "32"}, timeout=60)
        assert response.status_code == 202, response.text
        assert _exchange(port, _request("/v2/models/slow/infer", _slow(1)))[0][0] == 200  # its route, in a task
        client = _send(port, _request("/v2/models/slow/infer", _slow(10**9)))
        _until(lambda: app.state.services.predict.watchdog.running() == 1, "the slow run started")
    # uvicorn_in_thread's exit: should_exit, a 1 s drain, then the cancel
    with client:
        answer = client.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"retry-after: 1" in answer.lower() and answer.endswith(b'{"error":"the service is stopping"}')

"""The short path of app/http_protocol.py, over real sockets to uvicorn (in this process, a thread): /v2 infer and
/v1 predict answered from the parser's callbacks, not through uvicorn's ASGI cycle, with the same answers and
errors as the ASGI fast path, in order on one connection, and counted by /metrics.

The ASGI path to compare with is the same server's: a trailing slash (`.../infer/`) takes uvicorn's cycle and then
the app's fast path (app/main.py strips the slash), so each request is sent both ways and the raw answers (all
but the date header) must be equal.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.main import Onnxforge, create_app
from app.settings import Settings
from optimizer.runtime import create_session
from tests import models
from tests.conftest import TEST_SETTINGS
from tests.service import free_port
from tests.test_robust_disconnect import uvicorn_in_thread

READ_KEY = "read-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
LIMIT = 20_000
FEED = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
V2_JSON = json.dumps({"inputs": [{"name": "features", "shape": [3, 64], "datatype": "FP32",
                                  "data": FEED.ravel().tolist()}]}).encode()
V1_JSON = json.dumps({"inputs": {"features": FEED.tolist()}}).encode()
_HEADER = json.dumps({"inputs": [{"name": "features", "shape": [3, 64], "datatype": "FP32",
                                  "parameters": {"binary_data_size": FEED.nbytes}}],
                      "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
V2_BINARY = _HEADER + FEED.tobytes()
BINARY_HEADERS = {"Inference-Header-Content-Length": str(len(_HEADER)), "Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, list[str]]]:
    """(port, the paths the ASGI app was called with): uvicorn with the service's protocol, keys on."""
    paths: list[str] = []
    asgi = Onnxforge.__call__

    async def spy(self: Onnxforge, scope: dict, receive, send) -> None:  # noqa: ANN001
        paths.append(scope.get("path", ""))
        await asgi(self, scope, receive, send)

    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path_factory.mktemp("short") / "data", "run_worker": False,
                           "api_keys": f"admin:{ADMIN_KEY}, read:{READ_KEY}", "max_predict_body_bytes": LIMIT})
    app = create_app(settings)
    port = free_port()
    Onnxforge.__call__ = spy  # a witness of which requests reach the ASGI app, not a stand-in: it calls the real one
    try:
        with uvicorn_in_thread(app, port) as base:
            response = httpx.post(f"{base}/v1/models", files={"file": ("mlp.onnx", models.mlp().SerializeToString())},
                                  data={"name": "mlp"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
            assert response.status_code == 202, response.text
            yield port, paths
    finally:
        Onnxforge.__call__ = asgi


def _request(path: str, body: bytes, headers: dict[str, str] | None = None, key: str | None = READ_KEY,
             version: str = "1.1", method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: localhost", f"Content-Length: {len(body)}"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    lines += [f"{k}: {v}" for k, v in (headers or {"Content-Type": "application/json"}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Reader:
    """Reads HTTP/1.1 answers with a Content-Length off one socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def answer(self) -> tuple[int, dict[str, str], bytes, bytes]:
        """(status, headers, body, raw head)."""
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-answer: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            assert self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), headers, body, head

    def closed(self) -> bool:
        return not self.buffer and not self._fill()


def _exchange(port: int, *requests: bytes) -> list[tuple[int, dict[str, str], bytes, bytes]]:
    """Send `requests` at once on one connection (pipelined) and read as many answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"".join(requests))
        reader = _Reader(sock)
        return [reader.answer() for _ in requests]


def _logits(status: int, headers: dict[str, str], body: bytes) -> np.ndarray:
    assert status == 200, body
    if "inference-header-content-length" in headers:
        length = int(headers["inference-header-content-length"])
        assert json.loads(body[:length])["outputs"][0]["parameters"]["binary_data_size"] == 120
        return np.frombuffer(body[length:], np.float32).reshape(3, 10)
    answer = json.loads(body)
    outputs = answer["outputs"]
    if isinstance(outputs, dict):  # /v1
        return np.asarray(outputs["logits"], np.float32)
    return np.asarray(outputs[0]["data"], np.float32).reshape(outputs[0]["shape"])


def test_hot_routes_skip_the_asgi_cycle_and_equal_onnx_runtime(server: tuple[int, list[str]]) -> None:
    port, paths = server
    expected = create_session(models.mlp().SerializeToString()).run(None, {"features": FEED})[0]
    hot = {"/v2/models/mlp/infer": (V2_BINARY, BINARY_HEADERS), "/v2/models/mlp/versions/1/infer": (V2_JSON, None),
           "/v1/models/mlp/predict": (V1_JSON, None), "/v1/models/mlp/versions/1/predict": (V1_JSON, None)}
    paths.clear()
    for path, (body, headers) in hot.items():
        (status, answer_headers, content, _), = _exchange(port, _request(path, body, headers))
        np.testing.assert_allclose(_logits(status, answer_headers, content), expected, rtol=1e-5, atol=1e-6)
    assert not set(paths) & set(hot), f"a hot request went through uvicorn's ASGI cycle: {paths}"
    # What the short path leaves to uvicorn's cycle still reaches the app, and is answered alike.
    others = [_request("/v2/models/mlp/infer/", V2_JSON), _request("/v2/models/mlp/infer", V2_JSON, version="1.0"),
              _request("/v1/models/mlp/predict", V1_JSON, {"Expect": "100-continue"})]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = _Reader(sock)
        sock.sendall(others[2][: others[2].index(b"\r\n\r\n") + 4])
        assert reader.answer()[0] == 100  # Continue: then the body
        sock.sendall(V1_JSON)
        np.testing.assert_allclose(_logits(*reader.answer()[:3]), expected, rtol=1e-5, atol=1e-6)
    for request in others[:2]:
        (status, headers, content, _), = _exchange(port, request)
        np.testing.assert_allclose(_logits(status, headers, content), expected, rtol=1e-5, atol=1e-6)
    assert paths == ["/v1/models/mlp/predict", "/v2/models/mlp/infer/", "/v2/models/mlp/infer"], paths


BAD_TENSOR = json.dumps({"inputs": [{"name": "features", "shape": [3, 5], "datatype": "FP32",
                                     "data": [0.0] * 15}]}).encode()
CASES = {
    "v2 binary": ("/v2/models/mlp/infer", V2_BINARY, BINARY_HEADERS, READ_KEY, 200),
    "v2 json": ("/v2/models/mlp/infer", V2_JSON, None, READ_KEY, 200),
    "v1": ("/v1/models/mlp/predict", V1_JSON, None, READ_KEY, 200),
    "unknown model": ("/v2/models/nope/infer", V2_JSON, None, READ_KEY, 404),
    "unknown version": ("/v1/models/mlp/versions/7/predict", V1_JSON, None, READ_KEY, 404),
    "bad tensor": ("/v2/models/mlp/infer", BAD_TENSOR, None, READ_KEY, 400),
    "not json": ("/v1/models/mlp/predict", b"{", None, READ_KEY, 422),
    "no key": ("/v2/models/mlp/infer", V2_JSON, None, None, 401),
    "wrong key": ("/v1/models/mlp/predict", V1_JSON, None, "not-a-key-0123456789", 401),
    "over the body limit": ("/v2/models/mlp/infer", b" " * (LIMIT + 1), None, READ_KEY, 413),
    "bad gzip": ("/v2/models/mlp/infer", b"not gzip", {"Content-Encoding": "gzip"}, READ_KEY, 400),
}


@pytest.mark.parametrize("case", list(CASES))
def test_answers_equal_the_asgi_paths_byte_for_byte(server: tuple[int, list[str]], case: str) -> None:
    """Same status, headers and body as the ASGI fast path (403 cannot happen here: a read key may predict)."""
    port, _ = server
    path, body, headers, key, status = CASES[case]
    short, asgi = _exchange(port, _request(path, body, headers, key), _request(path + "/", body, headers, key))
    assert short[0] == status, short[2]

    def without_date(head: bytes) -> list[bytes]:
        return [line for line in head.split(b"\r\n") if not line.startswith(b"date: ")]

    assert (without_date(short[3]), short[2]) == (without_date(asgi[3]), asgi[2])
    assert "date" in short[1] and "server" not in short[1]  # uvicorn's default headers, as the service sets them


def test_over_the_limit_while_the_body_streams_in(server: tuple[int, list[str]]) -> None:
    """A chunked body (no Content-Length) is refused once it passes the limit; the connection goes on."""
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = _Reader(sock)
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
                     + READ_KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            sock.sendall(b"%x\r\n%s\r\n" % (LIMIT // 2, b" " * (LIMIT // 2)))
        status, _, body, _ = reader.answer()
        assert status == 413 and b"ONNXFORGE_MAX_PREDICT_BODY_BYTES" in body
        sock.sendall(b"0\r\n\r\n" + _request("/v2/models/mlp/infer", V2_JSON))
        assert reader.answer()[0] == 200


def test_pipelined_requests_are_answered_in_order_and_close_is_honoured(server: tuple[int, list[str]]) -> None:
    port, _ = server
    requests = [_request("/v2/models/mlp/infer", V2_BINARY, BINARY_HEADERS),
                _request("/v2/models/mlp", b"", key=READ_KEY, method="GET"),
                _request("/v1/models/mlp/predict", V1_JSON),
                _request("/v2/models/nope/infer", V2_JSON),
                _request("/v2/models/mlp/infer", V2_JSON),
                _request("/v1/models/mlp/predict", V1_JSON, {"Connection": "close"})]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"".join(requests))
        reader = _Reader(sock)
        answers = [reader.answer() for _ in requests]
        assert reader.closed(), "Connection: close was not honoured"
    assert [a[0] for a in answers] == [200, 200, 200, 404, 200, 200]
    assert "inference-header-content-length" in answers[0][1]
    assert json.loads(answers[1][2])["name"] == "mlp"
    assert json.loads(answers[2][2])["model"] == "mlp" and json.loads(answers[5][2])["model"] == "mlp"
    assert json.loads(answers[4][2])["model_name"] == "mlp"
    assert answers[5][1].get("connection") == "close" and "connection" not in answers[4][1]


def _count(port: int, status: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {READ_KEY}"}).text
    for line in text.splitlines():
        if line.startswith("onnxforge_http_requests_total{") and 'route="/v2/models/{name}/infer"' in line \
                and f'status="{status}"' in line:
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_the_short_path(server: tuple[int, list[str]]) -> None:
    port, _ = server
    ok, refused = _count(port, "200"), _count(port, "401")
    _exchange(port, *[_request("/v2/models/mlp/infer", V2_JSON)] * 5)
    _exchange(port, _request("/v2/models/mlp/infer", V2_JSON, key=None))
    assert (_count(port, "200"), _count(port, "401")) == (ok + 5, refused + 1)


def test_a_client_gone_mid_body_leaves_the_server_answering(server: tuple[int, list[str]]) -> None:
    port, _ = server
    gone = _count(port, "499")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        request = _request("/v2/models/mlp/infer", V2_JSON)
        sock.sendall(request[: len(request) - 100])
    deadline = time.monotonic() + 10
    while _count(port, "499") != gone + 1:  # counted as nginx logs it
        assert time.monotonic() < deadline, "the request of a client gone mid-body was not counted 499"
        time.sleep(0.05)
    (status, *_), = _exchange(port, _request("/v2/models/mlp/infer", V2_JSON))
    assert status == 200


def test_a_graceful_shutdown_answers_the_request_in_flight_then_closes(tmp_path: Path) -> None:
    """uvicorn's drain (SIGTERM): a short request running when it starts is answered, with `connection: close`,
    and its connection closes; the server then stops."""
    import threading

    import uvicorn

    from app.prefork import UVICORN_OPTIONS
    from tests.test_robust_shutdown import upload_slow

    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "data", "run_worker": False})
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           **{**UVICORN_OPTIONS, "timeout_graceful_shutdown": 30}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        upload_slow(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30).post)
        slow = json.dumps({"inputs": {"trips": [300_000], "x": [[0.1] * 64]}}).encode()  # ~1 s of runs
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(_request("/v1/models/slow/predict", slow, key=None))
            deadline = time.monotonic() + 30
            while app.state.services.predict.watchdog.running() != 1:
                assert time.monotonic() < deadline, "the slow run never started"
                time.sleep(0.01)
            server.should_exit = True
            reader = _Reader(sock)
            status, headers, body, _ = reader.answer()
            assert (status, headers.get("connection")) == (200, "close"), body
            assert json.loads(body)["model"] == "slow"
            assert reader.closed()
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"
    finally:
        server.should_exit = True
        thread.join(30)

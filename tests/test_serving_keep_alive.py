"""The keep-alive timeout of app/http_protocol.py (one timer per idle spell, not one per request): a connection idle
for the timeout is closed, as uvicorn closes it; one whose requests keep coming within the timeout stays open however
long it lives; the timeout counts from the last response. Real uvicorn in this process (a thread), real sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from app import http_protocol
from app.main import create_app
from app.settings import Settings
from tests import models
from tests.conftest import TEST_SETTINGS
from tests.service import free_port
from tests.test_robust_disconnect import uvicorn_in_thread
from tests.test_serving_batched_path import _request
from tests.test_serving_protocol_path import V2_JSON, _Reader

KEEP_ALIVE_S = 1.0


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path_factory.mktemp("keepalive") / "data",
                           "run_worker": False})
    number = free_port()
    with uvicorn_in_thread(create_app(settings), number, timeout_keep_alive=KEEP_ALIVE_S):
        response = httpx.post(f"http://127.0.0.1:{number}/v1/models", timeout=60, data={"name": "mlp"},
                              files={"file": ("mlp.onnx", models.mlp().SerializeToString())})
        assert response.status_code == 202, response.text
        yield number


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closes `sock` (None: still open after `seconds`)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return None
    assert data == b"", data
    return time.monotonic() - started


@pytest.mark.parametrize("path", ["/v2/models/mlp/infer", "/v2/models/mlp/infer/"])  # the short path, uvicorn's cycle
def test_an_idle_connection_closes_after_the_timeout_and_a_busy_one_stays(port: int, path: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = _Reader(sock)
        began = time.monotonic()
        while time.monotonic() - began < 3 * KEEP_ALIVE_S:  # requests every 0.3 s for three timeouts: stays open
            sock.sendall(_request(path, V2_JSON))
            status, _, body, _ = reader.answer()
            assert status == 200, body
            time.sleep(KEEP_ALIVE_S * 0.3)
        sock.sendall(_request(path, V2_JSON))
        assert reader.answer()[0] == 200
        closed = _closed_within(sock, 5 * KEEP_ALIVE_S)  # then idle: closed one timeout after the last answer
        assert closed is not None, "an idle connection was not closed"
        assert 0.8 * KEEP_ALIVE_S <= closed <= 2.5 * KEEP_ALIVE_S, closed


# -- the head timeout (app.http_protocol.HEAD_TIMEOUT_S): a connection must send each request's head in time ---------

HEAD_S = 1.0


@pytest.fixture
def head_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(http_protocol, "HEAD_TIMEOUT_S", HEAD_S)
    return HEAD_S


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(port: int, head_timeout: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        closed = _closed_within(sock, 5 * head_timeout)
        assert closed is not None, "a silent connection was held open"
        assert 0.8 * head_timeout <= closed <= 2.5 * head_timeout, closed


def test_a_head_trickled_a_line_at_a_time_is_cut_at_the_head_timeout(port: int, head_timeout: float) -> None:
    """Slowloris: a header line every 0.2 s keeps the connection busy, but its head never completes in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        began = time.monotonic()
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        cut = None
        for i in range(30):  # 6 s of header lines at most
            time.sleep(0.2)
            try:
                sock.sendall(b"X-Slow-%d: x\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                cut = time.monotonic() - began
                break
            sock.settimeout(0.01)
            try:
                if sock.recv(1) == b"":
                    cut = time.monotonic() - began
                    break
            except TimeoutError:
                pass
        assert cut is not None, "a trickled head was held open for 6 s"
        assert cut <= 2.5 * head_timeout, cut


def test_heads_sent_in_time_are_answered_however_long_the_connection_lives(port: int, head_timeout: float) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = _Reader(sock)
        request = _request("/v2/models/mlp/infer", V2_JSON)
        sock.sendall(request[:20])  # a head in two parts, half a timeout apart
        time.sleep(0.5 * head_timeout)
        sock.sendall(request[20:])
        assert reader.answer()[0] == 200
        began = time.monotonic()
        while time.monotonic() - began < 3 * head_timeout:  # keep-alive requests for three head timeouts
            time.sleep(0.3 * head_timeout)
            sock.sendall(request)
            status, _, body, _ = reader.answer()
            assert status == 200, body

"""SIGTERM: requests still running when the graceful drain ends get a 503 the proxy can replay (not a plain-text
500 and a traceback); with --workers 2 the listening socket closes at once (new connections are refused, not left
hanging) and the exit status is the one process's: death by SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h

from tests.test_robust_prefork import _serve

SLOW = {"inputs": {"trips": [10**9], "x": [[0.1] * 64]}}


def slow_loop() -> onnx.ModelProto:
    """A Loop whose trip count the client sends: as slow as asked (a 64x64 MatMul a trip)."""
    weights = (np.random.default_rng(0).standard_normal((64, 64)) * 0.05).astype(np.float32)
    body = h.make_graph(
        [
            h.make_node("MatMul", ["x_in", "w"], ["x_mm"]),
            h.make_node("Tanh", ["x_mm"], ["x_out"]),
            h.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            h.make_tensor_value_info("i", T.INT64, []),
            h.make_tensor_value_info("cond_in", T.BOOL, []),
            h.make_tensor_value_info("x_in", T.FLOAT, [1, 64]),
        ],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("x_out", T.FLOAT, [1, 64])],
        [h.make_tensor("w", T.FLOAT, [64, 64], weights.ravel().tolist())],
    )
    graph = h.make_graph(
        [
            h.make_node("Constant", [], ["cond"], value=h.make_tensor("c", T.BOOL, [], [True])),
            h.make_node("Reshape", ["trips", "one"], ["trip"]),
            h.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body),
        ],
        "slowloop",
        [h.make_tensor_value_info("trips", T.INT64, [1]), h.make_tensor_value_info("x", T.FLOAT, [1, 64])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 64])],
        [h.make_tensor("one", T.INT64, [0], [])],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def calibration() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, trips=np.full((4, 1), 3, np.int64), x=np.full((4, 1, 64), 0.1, np.float32))
    return buffer.getvalue()


def upload_slow(post) -> None:  # noqa: ANN001 - client.post of httpx or a TestClient
    files = {
        "file": ("slow.onnx", slow_loop().SerializeToString(), "application/octet-stream"),
        "calibration": ("samples.npz", calibration(), "application/octet-stream"),
    }
    response = post("/v1/models", files=files, data={"name": "slow"})
    assert response.status_code == 202, response.text


def test_a_request_cancelled_by_the_shutdown_is_a_503(serve) -> None:  # noqa: ANN001
    """What uvicorn does once its graceful drain is over: cancel the request's task."""
    with serve(run_worker=False, predict_time_limit_s=5.0) as api:
        upload_slow(api.client.post)
        body = httpx.Request("POST", "http://x", json=SLOW).read()

        async def cancelled() -> list[dict]:
            sent: list[dict] = []
            started = asyncio.Event()

            async def receive() -> dict:
                started.set()
                return {"type": "http.request", "body": body, "more_body": False}

            async def send(message: dict) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/v1/models/slow/predict",
                "raw_path": b"",
                "root_path": "",
                "query_string": b"",
                "headers": [(b"content-type", b"application/json")],
                "http_version": "1.1",
                "scheme": "http",
                "server": ("127.0.0.1", 80),
                "client": ("127.0.0.1", 1),
            }
            task = asyncio.create_task(api.client.app(scope, receive, send))
            await started.wait()
            await asyncio.sleep(0.2)  # into the model's run (a cancel anywhere in the request answers alike)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return sent

        sent = api.client.portal.call(cancelled)
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
        assert (b"retry-after", b"1") in sent[0]["headers"]
        assert sent[1]["body"] == b'{"error":"the service is stopping"}'


def test_sigterm_with_workers_refuses_new_connections_and_exits_as_one_process(tmp_path: Path) -> None:
    base, process, log = _serve(tmp_path, "--workers", "2", predict_time_limit_s=5)
    try:
        upload_slow(httpx.Client(base_url=base, timeout=30).post)
        # The slow request sent whole on its own connection (so its API process has it): it keeps that process
        # draining after SIGTERM, for up to predict_time_limit_s.
        payload = json.dumps(SLOW).encode()
        port = int(base.rsplit(":", 1)[1])
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        slow.sendall(
            b"POST /v1/models/slow/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        time.sleep(0.5)  # read by its API process (not a timing assert: only how soon the signal goes)
        process.send_signal(signal.SIGTERM)
        refused = False
        for _ in range(40):  # until the parent has taken the signal (it looks every 0.5 s)
            try:
                httpx.get(f"{base}/v2", timeout=httpx.Timeout(10, connect=2))
            except httpx.ConnectError:
                refused = True
                break
            except httpx.TimeoutException:
                break  # accepted by the kernel, answered by nobody: the hang that closing the socket prevents
            except httpx.TransportError:
                pass  # reset: queued on the listening socket the instant an API process closed it (a proxy retries)
            time.sleep(0.1)
        assert refused, "a new connection after SIGTERM was not refused"
        assert process.poll() is None, "the refusal should come while the slow request still drains"
        assert process.wait(30) == -signal.SIGTERM, log.read_text()[-2000:]
        slow.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_uvicorn_stopping_answers_what_its_drain_did_not_finish_with_503(tmp_path: Path) -> None:
    """The same through uvicorn itself (in this process, a 1 s drain): a slow request running and one queued behind
    it when the drain ends each get the 503, not uvicorn's plain-text 500."""
    from app.main import create_app
    from app.settings import Settings
    from tests.conftest import TEST_SETTINGS
    from tests.service import free_port
    from tests.test_robust_disconnect import _send, _until, uvicorn_in_thread

    settings = Settings(
        **{
            **TEST_SETTINGS,
            "data_dir": tmp_path / "data",
            "run_worker": False,
            "predict_threads": 1,
            "predict_time_limit_s": 6,
        }
    )
    app = create_app(settings)
    port = free_port()
    with uvicorn_in_thread(app, port) as base:
        upload_slow(httpx.Client(base_url=base, timeout=30).post)
        lanes = app.state.services.predict.lanes
        clients = [_send(port, SLOW), _send(port, SLOW)]
        _until(lambda: sum(len(q) for q in list(lanes._queued.values())) == 1, "one running, one queued")
    # uvicorn_in_thread's exit: should_exit, a 1 s drain, then the cancel
    for client in clients:
        answer = client.recv(65536)
        client.close()
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 1" in answer.lower() and answer.endswith(b'{"error":"the service is stopping"}')

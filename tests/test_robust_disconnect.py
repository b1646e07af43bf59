"""A request whose client went away is not run: queued behind a slow model's run (one run of a model at a time
here), it would otherwise hold the model up to the time limit, answered to nobody, before the requests behind it.

uvicorn in this process (a thread), so the test can look at the model's lane: after the first slow run ends, the
two requests queued behind it are dropped, not run in turn."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from app.main import create_app
from app.prefork import UVICORN_OPTIONS
from app.settings import Settings
from tests.conftest import TEST_SETTINGS
from tests.service import free_port
from tests.test_robust_shutdown import SLOW, upload_slow

LIMIT_S = 4.0


@contextmanager
def uvicorn_in_thread(app, port: int, **options: object) -> Iterator[str]:  # noqa: ANN001
    """uvicorn serving `app` on 127.0.0.1:`port` in a thread of this process (`options`: more uvicorn settings)."""
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning",
            **{**UVICORN_OPTIONS, "timeout_graceful_shutdown": 1, **options}
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _send(port: int, body: dict) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/models/slow/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    return sock


def _until(condition, what: str, timeout: float = 30) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def test_requests_of_clients_gone_are_not_run(tmp_path: Path) -> None:
    settings = Settings(
        **{
            **TEST_SETTINGS,
            "data_dir": tmp_path / "data",
            "run_worker": False,
            "predict_threads": 1,
            "predict_time_limit_s": LIMIT_S,
        }
    )
    app = create_app(settings)
    port = free_port()
    with uvicorn_in_thread(app, port) as base:
        upload_slow(httpx.Client(base_url=base, timeout=30).post)
        lanes = app.state.services.predict.lanes

        def queued() -> int:
            return sum(len(q) for q in list(lanes._queued.values()))

        clients = [_send(port, SLOW)]
        _until(lambda: app.state.services.predict.watchdog.running() == 1, "the first slow run started")
        clients += [_send(port, SLOW), _send(port, SLOW)]
        _until(lambda: queued() == 2, "two slow requests queued behind it")
        # (closed at once: the fast path watches a request from WATCH_AFTER_S on, and then sees it gone)
        for client in clients:
            client.close()
        _until(lambda: queued() < 2, "the first run stopped at the time limit", timeout=LIMIT_S * 5)
        time.sleep(0.5)  # a run of a queued request would now be in ONNX Runtime, for up to LIMIT_S
        assert queued() == 0 and app.state.services.predict.watchdog.running() == 0, "a gone client's request ran"
        quick = httpx.post(
            f"{base}/v1/models/slow/predict", json={"inputs": {"trips": [3], "x": [[0.1] * 64]}}, timeout=30
        )
        assert quick.status_code == 200, quick.text
        text = httpx.get(f"{base}/metrics").text
        gone = [
            line for line in text.splitlines() if line.startswith("onnxforge_http_requests_total") and '"499"' in line
        ]
        assert gone and float(gone[0].split()[-1]) == 3, gone


def test_the_batcher_drops_requests_whose_callers_went_away() -> None:
    """Requests waiting in the batcher's queue whose tasks were cancelled (the fast path cancels a request whose
    client disconnected) are left out of the batch: only the live one's rows run."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from app.runtime.batching import Batcher
    from optimizer.runtime import create_session
    from tests import models

    session = create_session(models.mlp().SerializeToString())
    executor = ThreadPoolExecutor(1)
    batches: list[int] = []
    batcher = Batcher(
        executor, max_batch_size=8, max_running=1, observe=lambda key, depth, rows, waits: batches.append(rows)
    )
    feed = {"features": np.ones((1, 64), np.float32)}

    async def scenario() -> list:
        gate = threading.Event()
        executor.submit(gate.wait)  # the one thread busy: the first batch waits in the executor, the rest in the queue
        first = asyncio.ensure_future(batcher.run("m", session, ["logits"], feed))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(batcher.run("m", session, ["logits"], feed)) for _ in range(3)]
        await asyncio.sleep(0)
        waiting[0].cancel()
        waiting[1].cancel()
        gate.set()
        return await asyncio.gather(first, *waiting, return_exceptions=True)

    try:
        results = asyncio.run(scenario())
    finally:
        executor.shutdown()
    assert batches == [1, 1], batches  # the first alone, then only the one whose caller still waits
    assert [type(r).__name__ for r in results] == ["list", "CancelledError", "CancelledError", "list"]
    np.testing.assert_allclose(results[3][0], session.run(["logits"], feed)[0], rtol=1e-6)

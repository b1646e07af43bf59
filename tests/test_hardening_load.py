"""The real server (uvicorn on 127.0.0.1) under a bounded mixed load, and killed mid-upload and mid-job.

Load: predict traffic on a model that stays registered while other models are uploaded, predicted
and deleted. Zero failed predicts for the model that stays, no leaked sessions or file handles,
memory flat. Short by default; `pytest -m slow` runs the long version.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.store import Database, Job
from tests import models
from tests.service import start_service


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[Path], tuple[str, subprocess.Popen]]]:
    """`start(data_dir)` runs `onnxforge serve` on 127.0.0.1 and waits until ready; all are killed at the end."""
    started: list[subprocess.Popen] = []

    def run(data: Path) -> tuple[str, subprocess.Popen]:
        base, process = start_service(data, tmp_path / f"server{len(started)}.log")
        started.append(process)
        return base, process

    yield run
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def _sessions_loaded(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("onnxforge_sessions_loaded"))


def _wait_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def _upload(client: httpx.Client, name: str, seed: int) -> httpx.Response:
    model = models.mlp(seed=seed).SerializeToString()
    return client.post("/v1/models", files={"file": (f"{name}.onnx", model)}, data={"name": name, "precision": "fp32"})


def _feed() -> dict[str, list]:
    return {k: v.tolist() for k, v in models.random_feed(models.mlp(), batch=2).items()}


def _load_round(base: str, feed: dict, expected: np.ndarray, predicts_per_thread: int, churn_rounds: int,
                threads: int, failures: list[str]) -> None:
    """`threads` clients predicting on `stay` while one client uploads, predicts and deletes other models."""
    done = threading.Event()

    def predictor() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            for _ in range(predicts_per_thread):
                response = client.post("/v1/models/stay/predict", json={"inputs": feed})
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                elif not np.allclose(response.json()["outputs"]["logits"], expected, atol=1e-5):
                    failures.append("wrong answer")

    def churner() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            for i in range(churn_rounds):
                name = f"churn{i % 3}"
                accepted = _upload(client, name, seed=10 + i)
                assert accepted.status_code == 202, accepted.text
                client.post(f"/v1/models/{name}/predict", json={"inputs": feed})  # original version serves
                if i % 2:
                    _wait_job(client, accepted.json()["job_id"])
                    assert client.post(f"/v1/models/{name}/predict", json={"inputs": feed}).status_code == 200
                assert client.delete(f"/v1/models/{name}").status_code == 200
        done.set()

    workers = [threading.Thread(target=predictor) for _ in range(threads)] + [threading.Thread(target=churner)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(600)
    assert done.is_set(), "the upload/delete churn did not finish"


def _client_connections(port: int) -> int:
    """Connections the server on `port` still holds open (established, or closed by the client only)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            count += int(local.rsplit(":", 1)[1], 16) == port and state in ("01", "08")  # ESTABLISHED, CLOSE_WAIT
    return count


def _settled(base: str, timeout: float = 30) -> None:
    """Wait until the server has closed every client's socket: its event loop does so when it gets to it, which a
    loaded machine may delay past any fixed sleep (a socket still open then counts as a leaked file handle)."""
    port = int(base.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while _client_connections(port):
        assert time.monotonic() < deadline, f"the server kept {_client_connections(port)} client connection(s) open"
        time.sleep(0.05)


def _mixed_load(base: str, pid: int, rounds: int, predicts_per_thread: int, churn_rounds: int,
                threads: int = 3) -> dict:
    """Rounds of mixed load; file handles, memory and sessions measured after each (the first round warms
    up pools that grow to a bound: database connections, ONNX Runtime arenas, thread pools)."""
    with httpx.Client(base_url=base, timeout=60) as client:
        assert _wait_job(client, _upload(client, "stay", seed=1).json()["job_id"])["status"] == "succeeded"
        feed = _feed()
        expected = np.array(client.post("/v1/models/stay/predict", json={"inputs": feed}).json()["outputs"]["logits"])
    failures: list[str] = []
    measured = []
    for _ in range(rounds):
        _load_round(base, feed, expected, predicts_per_thread, churn_rounds, threads, failures)
        with httpx.Client(base_url=base, timeout=60) as client:
            assert [m["name"] for m in client.get("/v1/models").json()] == ["stay"]
        _settled(base)  # the server has closed the clients' keep-alive sockets
        measured.append({"fds": _fds(pid), "rss_mb": round(_rss_mb(pid), 1), "sessions": _sessions_loaded(base)})
    return {"failures": failures, "measured": measured, "predicts": rounds * predicts_per_thread * threads,
            "uploads_and_deletes": rounds * churn_rounds}


def _assert_held(result: dict) -> None:
    first, last = result["measured"][0], result["measured"][-1]
    assert result["failures"] == [], result["failures"][:5]
    assert all(m["sessions"] == 1 for m in result["measured"]), result  # deleted models' sessions were dropped
    assert last["fds"] <= first["fds"] + 2, result
    assert last["rss_mb"] <= first["rss_mb"] + 60, result


def test_mixed_load_zero_failed_predicts_no_leaks(start, tmp_path: Path) -> None:  # noqa: ANN001
    base, process = start(tmp_path / "data")
    _assert_held(_mixed_load(base, process.pid, rounds=3, predicts_per_thread=30, churn_rounds=2))


@pytest.mark.slow
def test_mixed_load_long(start, tmp_path: Path) -> None:  # noqa: ANN001
    base, process = start(tmp_path / "data")
    result = _mixed_load(base, process.pid, rounds=10, predicts_per_thread=300, churn_rounds=6)
    print({k: v for k, v in result.items() if k != "failures"})
    _assert_held(result)


# -- the whole service killed and restarted ------------------------------------------------------------


def _runner_pid(data: Path, job_id: str) -> int:
    """The job's optimizer child, once the worker has published it (the child is then tied to the worker's life)."""
    db = Database(f"sqlite:///{data / 'onnxforge.db'}")
    try:
        deadline = time.monotonic() + 60
        while True:
            with db.read() as session:
                job = session.get(Job, job_id)
            if job is not None and job.status == "running" and job.runner_pid:
                return job.runner_pid
            assert time.monotonic() < deadline, f"the job never started: {job and job.status}"
            time.sleep(0.01)
    finally:
        db.dispose()


def _slow_upload(base: str, body: bytes, stop: threading.Event) -> None:
    """Send a multipart upload at a trickle, so that the server dies while it is still arriving."""
    boundary = "hardeningboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"half.onnx\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall((f"POST /v1/models HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                      f"boundary={boundary}\r\nContent-Length: {len(head) + len(body) + 100}\r\n\r\n").encode())
        sock.sendall(head)
        for start in range(0, len(body), 4096):
            if stop.is_set():
                return
            try:
                sock.sendall(body[start:start + 4096])
            except OSError:
                return
            time.sleep(0.01)


def test_kill_mid_upload_and_mid_job_then_restart(start, tmp_path: Path) -> None:  # noqa: ANN001
    """SIGKILL the whole service while an upload streams in and a job runs; after a restart on the same
    data, the earlier model serves, the half upload left nothing, and the interrupted job finishes."""
    data = tmp_path / "data"
    base, process = start(data)
    with httpx.Client(base_url=base, timeout=60) as client:
        assert _wait_job(client, _upload(client, "early", seed=1).json()["job_id"])["status"] == "succeeded"
        feed = _feed()
        expected = client.post("/v1/models/early/predict", json={"inputs": feed}).json()["outputs"]
        running = _upload(client, "midjob", seed=2).json()["job_id"]
        # Frozen, the job cannot finish before the kill (polled for "running" instead, it could finish between two
        # polls, and the loop then waited out its deadline; or during the sleep below, and nothing was mid-job).
        # It dies with its worker, which dies with the service (their death signals).
        os.kill(_runner_pid(data, running), signal.SIGSTOP)

    stop = threading.Event()
    uploader = threading.Thread(target=_slow_upload, args=(base, models.mlp(hidden=512).SerializeToString(), stop))
    uploader.start()
    uploads = data / "tmp" / "uploads"
    deadline = time.monotonic() + 30
    while not any(f.stat().st_size for f in uploads.rglob("*") if f.is_file()):  # part of it is in (all: ~3 s)
        assert uploader.is_alive() and time.monotonic() < deadline, "the upload never reached the server's disk"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    stop.set()
    uploader.join(10)

    restarted, restarted_process = start(data)
    with httpx.Client(base_url=restarted, timeout=60) as client:
        names = [m["name"] for m in client.get("/v1/models").json()]
        assert sorted(names) == ["early", "midjob"], names  # the half upload never became a model
        assert client.post("/v1/models/early/predict", json={"inputs": feed}).json()["outputs"] == expected
        job = _wait_job(client, running)
        assert job["status"] in ("succeeded", "failed"), job  # never stuck in running
        if job["status"] == "failed":
            assert job["error"], job
        assert client.post("/v1/models/midjob/predict", json={"inputs": feed}).status_code == 200
    models_dir = data / "artifacts" / "models"
    assert sorted(p.name for p in models_dir.iterdir()) == ["early", "midjob"]
    # The half upload's scratch folder stays until it is old (another replica could be mid-upload into it),
    # then the next start removes it.
    leftovers = list(uploads.iterdir())
    assert leftovers
    for folder in leftovers:
        os.utime(folder, (0, 0))
    restarted_process.send_signal(signal.SIGTERM)
    restarted_process.wait(30)
    start(data)
    assert not any(folder.exists() for folder in leftovers)

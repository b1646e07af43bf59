"""Scale-out for real, on 127.0.0.1: a fresh database on the local PostgreSQL, two API replicas
(`serve --no-worker`) on their own ports, a worker process (`onnxforge worker`), and nginx in front
running deploy/nginx.conf with its upstream pointed at the two replicas.

Through nginx: an upload through one replica is optimized by the worker and served by both; killing
a replica mid-load loses no prediction (nginx retries them on the other); killing the worker mid-job
leaves the job to the next worker. Beside it: workers racing on one PostgreSQL queue never claim a
job twice. Skips with the reason when PostgreSQL, psycopg or nginx is missing (.ci/run installs them).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from app.services.jobs import JobQueue, worker_host
from app.store import Database, Job, ModelVersion
from tests import models

httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)),
                                      None)


# -- processes ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Stack:
    """The processes of one scaled-out deployment, and how to reach it through nginx."""

    def __init__(self, tmp: Path, database_url: str) -> None:
        self.tmp = tmp
        self.env = {
            **os.environ,
            "ONNXFORGE_DATABASE_URL": database_url, "ONNXFORGE_DATA_DIR": str(tmp / "data"),  # the shared volume
            "ONNXFORGE_PROVIDERS": "cpu", "ONNXFORGE_INTRA_OP_THREADS": "1", "ONNXFORGE_WORKER_POLL_S": "0.1",
            "ONNXFORGE_JOB_LEASE_S": "3", "ONNXFORGE_REGISTRY_CACHE_TTL_S": "0",
            "ONNXFORGE_OPTIMIZE_TIME_BUDGET_S": "4", "ONNXFORGE_LOG_LEVEL": "warning",
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.replica_ports: dict[str, int] = {}
        self.served: set[str] = set()  # replicas that were ready once: they come back on their port
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process's life
        process = subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def start_replica(self, name: str) -> None:
        port = self.replica_ports.get(name) or _free_port()  # a restarted replica comes back on its port
        self.replica_ports[name] = port
        self.start(name, "serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port))

    def wait_ready(self, name: str, timeout: float = 60) -> None:
        """Wait until replica `name` answers /readyz.

        A port that _free_port() found free can be taken before the replica binds it (another process's connection
        on a busy machine): the replica is then started again, on a new port if it never served (nginx is not
        pointed at it yet), else on its own port (nginx knows that one).
        """
        for _ in range(3):
            if self._ready(name, timeout):
                self.served.add(name)
                return
            if name not in self.served:
                del self.replica_ports[name]
            self.start_replica(name)
        raise AssertionError(f"{name} found its port taken 3 times: {self.log(name)}")

    def _ready(self, name: str, timeout: float) -> bool:
        """True once ready; False if the replica exited because its port was taken."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                if "address already in use" in self.log(name):
                    return False
                raise AssertionError(f"{name} exited: {self.log(name)}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.replica_ports[name]}/readyz", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{name} not ready in {timeout} s: {self.log(name)}")

    def start_nginx(self) -> None:
        """deploy/nginx.conf, with Docker's DNS name `api` replaced by the two replicas' ports; started again on
        another port when its own was taken before nginx bound it (as for the replicas)."""
        for _ in range(3):
            if self._start_nginx():
                return
            self.port = _free_port()
            self.url = f"http://127.0.0.1:{self.port}"
        raise AssertionError("nginx found its port taken 3 times")

    def _start_nginx(self) -> bool:
        """True once nginx answers; False if it exited because its port was taken."""
        conf = (ROOT / "deploy" / "nginx.conf").read_text()
        servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;"
                            for port in self.replica_ports.values())
        conf = re.sub(r"^\s*server api:8000 [^;]*;$", servers, conf, flags=re.M)
        conf = re.sub(r"^\s*resolver [^;]*;\n", "", conf, flags=re.M)
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{self.port};")
        run = self.tmp / "nginx"
        run.mkdir(exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the 0700 tmp dir
        conf = conf.replace("pid /tmp/nginx.pid;", f"{user}daemon off;\npid {run}/nginx.pid;\n"
                                                    f"error_log {run}/error.log warn;")
        temp = "".join(f"    {kind}_temp_path {run}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = conf.replace("http {\n", f"http {{\n    access_log {run}/access.log;\n{temp}", 1)
        (run / "nginx.conf").write_text(conf)
        log = open(self.tmp / "nginx.log", "wb")  # noqa: SIM115
        self.processes["nginx"] = subprocess.Popen([NGINX, "-p", str(run), "-c", str(run / "nginx.conf"),
                                                    "-e", str(run / "error.log")], stdout=log,
                                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.processes["nginx"].poll() is not None:
                errors = (run / "error.log").read_text()
                if "Address already in use" in errors:
                    del self.processes["nginx"]
                    return False
                raise AssertionError(errors)
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("nginx did not come up")

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.kill()
        process.wait(10)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for name in list(self.processes):
            process = self.processes.pop(name)
            process.send_signal(signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture(scope="module")
def stack(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run does)")
    stack = Stack(tmp_path_factory.mktemp("scale_out"), new_database())
    try:
        # All three at once, as compose starts them: they must not trip over each other creating the schema.
        stack.start_replica("replica-a")
        stack.start_replica("replica-b")
        stack.start("worker-1", "worker")
        stack.wait_ready("replica-a")
        stack.wait_ready("replica-b")
        stack.start_nginx()
        yield stack
    finally:
        stack.stop()


# -- through nginx -------------------------------------------------------------------------------------------


def _upload(client: httpx.Client, name: str, seed: int = 0) -> str:
    data = models.mlp(seed=seed).SerializeToString()
    response = client.post("/v1/models", files={"file": ("model.onnx", io.BytesIO(data))}, data={"name": name})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def _wait(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, f"job did not finish in {timeout} s: {job}"
        time.sleep(0.1)


FEED = {name: value.tolist() for name, value in models.random_feed(models.mlp()).items()}


def _predict(client: httpx.Client, name: str) -> tuple[np.ndarray, str]:
    response = client.post(f"/v1/models/{name}/predict", json={"inputs": FEED})
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"].values()
    return np.asarray(output), response.headers["X-Onnxforge-Upstream"]


def test_upload_through_nginx_is_optimized_by_the_worker_and_served_by_both_replicas(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        job = _wait(client, _upload(client, "shared"))
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job
        answers = [_predict(client, "shared") for _ in range(30)]
    upstreams = {upstream for _, upstream in answers}
    assert upstreams == {f"127.0.0.1:{port}" for port in stack.replica_ports.values()}  # both replicas answered
    first = answers[0][0]
    assert first.shape == (2, 10)
    for output, upstream in answers:
        np.testing.assert_array_equal(output, first, err_msg=f"{upstream} answered differently")


def test_worker_killed_mid_job_is_finished_by_another_worker(stack: Stack, new_database: Callable[[], str]) -> None:
    db = Database(stack.env["ONNXFORGE_DATABASE_URL"])
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        job_id = _upload(client, "orphan", seed=1)
        deadline = time.monotonic() + 60
        while True:  # the worker has started the optimizer child: freeze it so the job cannot finish first
            with db.read() as session:
                row = session.get(Job, job_id)
            if row.status == "running" and row.runner_pid:
                break
            assert time.monotonic() < deadline, f"the job never started: {stack.log('worker-1')}"
            time.sleep(0.02)
        first_worker = row.worker_id
        os.kill(row.runner_pid, signal.SIGSTOP)
        stack.kill("worker-1")  # its optimizer child dies with it (death signal)
        stack.start("worker-2", "worker")
        job = _wait(client, job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 2), job
        with db.read() as session:
            assert session.get(Job, job_id).worker_id != first_worker
        output, _ = _predict(client, "orphan")
        assert output.shape == (2, 10)
    db.dispose()


def _sessions_loaded(replica: str) -> float:
    metrics = httpx.get(f"{replica}/metrics", timeout=10).text
    return float(re.search(r"^onnxforge_sessions_loaded (\S+)$", metrics, re.M).group(1))


def test_a_model_deleted_through_one_replica_is_dropped_by_the_other(stack: Stack) -> None:
    a, b = (f"http://127.0.0.1:{stack.replica_ports[name]}" for name in ("replica-a", "replica-b"))
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        assert _wait(client, _upload(client, "doomed", seed=2))["status"] == "succeeded"
    for replica in (a, b):
        assert httpx.post(f"{replica}/v1/models/doomed/predict", json={"inputs": FEED}).status_code == 200
    loaded = _sessions_loaded(b)
    assert httpx.delete(f"{a}/v1/models/doomed").status_code == 200
    refused = httpx.post(f"{b}/v1/models/doomed/predict", json={"inputs": FEED})
    assert refused.status_code == 404, refused.text
    assert _sessions_loaded(b) == loaded - 1  # freed now, not when its LRU gets to it


class Load:
    """Four clients predicting through nginx until stopped; records who answered and what failed."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.answered: list[str] = []
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(4)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        with httpx.Client(base_url=self.stack.url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    _, upstream = _predict(client, "shared")
                except (AssertionError, httpx.HTTPError) as exc:
                    with self._lock:
                        self.failures.append(str(exc)[:300])
                    continue
                with self._lock:
                    self.answered.append(upstream)

    def until(self, n_answers: int, timeout: float = 60) -> None:
        """Wait until `n_answers` more requests were answered."""
        target = len(self.answered) + n_answers
        deadline = time.monotonic() + timeout
        while len(self.answered) < target:
            assert time.monotonic() < deadline and not self.failures, self.failures[:3]
            time.sleep(0.01)

    def until_answered_by(self, upstream: str, timeout: float = 40) -> None:
        """Wait until `upstream` answers again (nginx skips a failed server for its fail_timeout)."""
        seen = len(self.answered)
        deadline = time.monotonic() + timeout
        while upstream not in self.answered[seen:]:
            assert time.monotonic() < deadline and not self.failures, self.failures[:3]
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_rolling_restart_of_a_replica_loses_no_prediction(stack: Stack) -> None:
    """SIGTERM (what docker stop sends): the replica finishes what it has, nginx sends the rest elsewhere."""
    b = f"127.0.0.1:{stack.replica_ports['replica-b']}"
    load = Load(stack)
    try:
        load.until(40)
        stopping = stack.processes.pop("replica-b")
        stopping.terminate()
        # uvicorn drains, runs the lifespan's shutdown, then re-raises the SIGTERM it caught: -15, in time.
        assert stopping.wait(40) == -signal.SIGTERM, stack.log("replica-b")
        assert "Traceback" not in stack.log("replica-b")
        load.until(40)
        stack.start_replica("replica-b")
        stack.wait_ready("replica-b")
        load.until_answered_by(b)  # back in the rotation
    finally:
        load.stop()
    assert load.failures == []
    assert b in load.answered[:40]  # it served before the restart too


def test_killing_a_replica_mid_load_loses_no_prediction(stack: Stack) -> None:
    load = Load(stack)
    try:
        load.until(40)
        killed_at = len(load.answered)
        stack.kill("replica-b")
        load.until(80)
    finally:
        load.stop()
    assert load.failures == []
    survivor = f"127.0.0.1:{stack.replica_ports['replica-a']}"
    assert f"127.0.0.1:{stack.replica_ports['replica-b']}" in load.answered[:killed_at]  # it served before dying
    assert set(load.answered[-40:]) == {survivor}  # ... and only the survivor afterwards


# -- the queue on PostgreSQL ------------------------------------------------------------------------------


def test_workers_racing_on_postgresql_never_claim_a_job_twice(new_database: Callable[[], str]) -> None:
    db = Database(new_database())
    db.create_schema()
    expected = []
    with db.write() as session:
        for i in range(40):
            version = ModelVersion(name=f"m{i}", version=1, status="optimizing", filename="m.onnx",
                                   sha256="0" * 64, size_bytes=1)
            session.add(version)
            session.flush()
            job = Job(version_id=version.id, name=version.name, version=1)
            session.add(job)
            session.flush()
            expected.append(job.id)
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def work(n: int) -> None:
        queue = JobQueue(Database(db.url), lease_s=30, max_attempts=2)  # its own engine and connections
        barrier.wait()
        while (job := queue.claim(f"{worker_host()}:0:w{n}")) is not None:
            with lock:
                claimed.append(job.id)
        queue.db.dispose()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(claimed) == sorted(expected)  # each job exactly once
    assert JobQueue(db, 30, 2).counts() == {"queued": 0, "running": 40, "succeeded": 0, "failed": 0}
    db.dispose()

"""Operator polish: nginx's retry rule, startup errors as one line, the worker's missing-store hint, /metrics for
operators, the CLI's bench names and help, thread sizing inside a container's CPU quota."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)),
                                      None)


# -- 1. nginx retries a predict on 502/503, never on the service's own 504 ---------------------------------


class _Replica:
    """A stand-in replica answering every request with one status and counting them: what is under test is
    nginx's retry rule on the service's answers, so the replicas need only answer as the service would."""

    def __init__(self, status: int) -> None:
        replica = self
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                replica.hits += 1
                body = b'{"detail": "stand-in"}'
                self.send_response(replica.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.status = status
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _nginx(tmp: Path, ports: list[int]) -> Iterator[str]:
    """deploy/nginx.conf as shipped, its upstream pointed at `ports` (as tests/test_scale_out.py does)."""
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;" for port in ports)
    conf = re.sub(r"^\s*server api:8000 [^;]*;$", servers, conf, flags=re.M)
    conf = re.sub(r"^\s*resolver [^;]*;\n", "", conf, flags=re.M)
    run = tmp / "nginx"
    run.mkdir(parents=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = conf.replace("pid /tmp/nginx.pid;", f"{user}daemon off;\npid {run}/nginx.pid;\nerror_log {run}/error.log;")
    temp = "".join(f"    {kind}_temp_path {run}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
    conf = conf.replace("http {\n", f"http {{\n    access_log off;\n{temp}", 1)
    for _ in range(3):
        port = _free_port()
        (run / "nginx.conf").write_text(conf.replace("listen 8080;", f"listen 127.0.0.1:{port};"))
        process = subprocess.Popen([NGINX, "-p", str(run), "-c", str(run / "nginx.conf"), "-e", str(run / "error.log")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    time.sleep(0.05)
            if process.poll() is None:
                yield f"http://127.0.0.1:{port}"
                return
            if "Address already in use" not in (run / "error.log").read_text():
                raise AssertionError((run / "error.log").read_text())
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
    raise AssertionError("nginx found its port taken 3 times")


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)")
def test_nginx_replays_a_predict_on_503_but_never_the_services_504(tmp_path: Path) -> None:
    timed_out = [_Replica(504), _Replica(504)]
    busy = [_Replica(503), _Replica(503)]
    try:
        with _nginx(tmp_path / "a", [r.port for r in timed_out]) as url:
            answer = httpx.post(f"{url}/v1/models/m/predict", json={"inputs": {}}, timeout=30)
            assert answer.status_code == 504
            assert sum(r.hits for r in timed_out) == 1, "a predict past its time limit was replayed elsewhere"
            assert "," not in answer.headers["X-Onnxforge-Upstream"]
        with _nginx(tmp_path / "b", [r.port for r in busy]) as url:
            answer = httpx.post(f"{url}/v2/models/m/infer", json={"inputs": []}, timeout=30)
            assert answer.status_code == 503
            assert [r.hits for r in busy] == [1, 1]  # a busy replica's predict goes to the next one
    finally:
        for replica in (*timed_out, *busy):
            replica.close()


def test_nginx_conf_never_retries_on_504() -> None:
    rules = re.findall(r"proxy_next_upstream\s+([^;]*);", (ROOT / "deploy" / "nginx.conf").read_text())
    assert rules and all("http_504" not in rule and "error" in rule for rule in rules), rules


# -- 2. a setting the service cannot start with is one `error:` line, exit 2 ---------------------------------


def test_a_short_api_key_stops_serve_with_one_error_line(tmp_path: Path) -> None:
    env = {**os.environ, "ONNXFORGE_API_KEYS": "admin:short", "ONNXFORGE_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", "0", "--no-worker"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ONNXFORGE_API_KEYS: an API key is shorter than 16 characters")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "short" not in done.stderr.replace("shorter", "")  # the key itself is never printed


@pytest.mark.parametrize(("argv", "env", "said"), [
    (["serve", "--workers", "0"], {}, "--workers: must be a whole number from 1 to 256 (got 0)"),
    (["serve"], {"ONNXFORGE_PORT": "http"}, "ONNXFORGE_PORT: must be a whole number from 0 to 65535 (got 'http')"),
    (["serve", "--workers", "2"], {"ONNXFORGE_API_KEYS": "nobody:0123456789abcdef0123"},
     "ONNXFORGE_API_KEYS: unknown role 'nobody'"),
    (["worker"], {"ONNXFORGE_DATABASE_URL": "not a url"}, "ONNXFORGE_DATABASE_URL: cannot use this database URL"),
    (["worker", "--database-url", "oracle+nodriver://x/y"], {}, "--database-url: cannot use this database URL"),
    (["serve"], {"ONNXFORGE_STORAGE_URL": "gs://bucket"}, "ONNXFORGE_STORAGE_URL='gs://bucket': use s3://"),
    (["worker"], {"ONNXFORGE_JOB_LEASE_S": "0"}, "ONNXFORGE_JOB_LEASE_S: must be from 3 to 3600 seconds"),
    (["worker"], {"ONNXFORGE_DATABASE_URL": "postgresql://onnxforge:wrong@127.0.0.1:1/none"},
     "ONNXFORGE_DATABASE_URL: cannot reach the database postgresql+psycopg://onnxforge:***@127.0.0.1:1/none: "),
])
def test_settings_errors_at_startup_are_one_line(argv: list[str], env: dict[str, str], said: str,
                                                 tmp_path: Path) -> None:
    # in its own process with a timeout: a check that let a bad setting through would start serving for ever
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ONNXFORGE_")},
           "ONNXFORGE_DATA_DIR": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-m", "app.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {said}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["worker", "--data-dir", str(blocker / "data")]) == 2
    assert capsys.readouterr().err.startswith("error: --data-dir: cannot create")


# -- 3. a worker without the shared store says which settings must match -----------------------------------


def test_a_worker_without_the_shared_store_names_the_settings_to_share(serve, tmp_path: Path) -> None:  # noqa: ANN001
    from app.worker.loop import Worker
    from tests import models

    with serve(run_worker=False) as api:
        job_id = api.upload(models.mlp(), name="x", precision="fp32").json()["job_id"]
        shared = api.services.settings
        # `onnxforge worker` on the same database but its own data folder (a container without the volume)
        elsewhere = shared.model_copy(update={"data_dir": tmp_path / "elsewhere",
                                              "database_url": shared.resolved_database_url})
        worker = Worker(elsewhere)
        try:
            assert worker.run_once()
            for thread in worker._running:
                thread.join(60)
        finally:
            worker.db.dispose()
        job = api.wait(job_id)
        assert job["status"] == "failed"
        assert "missing from the store (models/x/1/original.onnx)" in job["error"]
        assert str((tmp_path / "elsewhere" / "artifacts").resolve()) in job["error"]
        assert "the same ONNXFORGE_DATA_DIR on a shared volume, or the same ONNXFORGE_STORAGE_URL" in job["error"]


# -- 4. /metrics for operators -------------------------------------------------------------------------------


def _value(text: str, series: str) -> float | None:
    found = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(series + " ")]
    return float(found[0]) if found else None


def test_metrics_show_workers_seen_and_queue_age_and_drop_a_deleted_versions_series(serve) -> None:  # noqa: ANN001
    from app.worker.loop import Worker
    from tests import models

    with serve(run_worker=False) as api:
        def scrape() -> str:
            response = api.client.get("/metrics")
            assert response.status_code == 200
            return response.text

        text = scrape()
        assert (_value(text, "onnxforge_workers_seen"), _value(text, "onnxforge_queue_oldest_seconds")) == (0, 0)
        assert "_created" not in text  # prometheus_client's creation timestamps: not exported
        for name in ("gone", "kept"):
            assert api.upload(models.mlp(), name=name, precision="fp32").status_code == 202
            assert api.predict(name, models.random_feed(models.mlp(), batch=1)).status_code == 200
        text = scrape()
        assert 0 < _value(text, "onnxforge_queue_oldest_seconds") < 600  # two jobs queued, no worker
        assert 'model="gone"' in text and 'model="kept"' in text

        worker = Worker(api.services.settings)  # a worker that beats (by the rule /readyz counts it)
        try:
            worker.queue.beat(worker.worker_id, 0)
            assert _value(scrape(), "onnxforge_workers_seen") == 1 == api.client.get("/readyz").json()["workers_seen"]
        finally:
            worker.db.dispose()

        assert api.client.delete("/v1/models/gone").status_code == 200
        text = scrape()
        assert 'model="gone"' not in text and 'model="kept"' in text
        assert api.predict("kept", models.random_feed(models.mlp(), batch=1)).status_code == 200
        assert _value(scrape(), 'onnxforge_predict_requests_total{model="kept",outcome="ok",variant="original",'
                                'version="1"}') == 2


# -- 5. uvicorn without proxy headers nor a `server` header ---------------------------------------------------


def test_the_served_answers_carry_no_server_header(tmp_path: Path) -> None:
    from tests.service import running_service

    with running_service(tmp_path, "--no-worker") as (url, _):
        answer = httpx.get(f"{url}/healthz", headers={"X-Forwarded-For": "203.0.113.7"}, timeout=10)
        assert answer.status_code == 200
        assert "server" not in answer.headers


# -- 6. the CLI: bench names its models by file, --time-budget says what it bounds ----------------------------


def test_bench_names_models_by_file_not_by_a_cut_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from app.cli import main
    from tests import models

    deep = tmp_path / ("a-long-cache-folder-name" * 3) / "onnxforge-bench" / "models"
    paths = [deep / "fp32" / "model.onnx", deep / "int8" / "model.onnx", deep / "ocr_det.onnx"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(models.mlp(), path)
    assert main(["bench", *map(str, paths), "--seconds", "0.1", "--batch", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["model", "batch"], table
    rows = [line.split()[0] for line in table[1:] if len(line.split()) == 6]  # model, batch, p50, p90, p99, per s
    assert rows == ["fp32/model.onnx", "int8/model.onnx", "ocr_det.onnx"]


def test_time_budget_help_says_the_final_timing_may_run_past_it() -> None:
    from app.cli import build_parser

    optimize = build_parser()._subparsers._group_actions[0].choices["optimize"]
    text = " ".join(optimize.format_help().split())
    assert "whole job" not in text
    assert "70% of it" in text and "at least 20 times each" in text


# -- 7. threads sized within the container's CPUs; the deploy files ------------------------------------------


def _cgroup(tmp: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    for name, text in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(text)
    (tmp / "proc_cgroup").write_text(proc)
    return tmp, tmp / "proc_cgroup"


def test_cpu_limit_reads_the_cgroup_quota_v2_and_v1(tmp_path: Path) -> None:
    from optimizer.runtime import cpu_limit

    cpus = len(os.sched_getaffinity(0))
    # v2, a pod's quota of half a CPU on the parent of this process's cgroup: rounds up to 1
    v2 = _cgroup(tmp_path / "v2", "0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "max 100000\n",
                                                               "kubepods/pod1/cpu.max": "50000 100000\n"})
    assert cpu_limit(*v2) == 1
    # v1 inside a container: /proc/self/cgroup names the host's path, the mount is the container's own cgroup
    v1 = _cgroup(tmp_path / "v1", "5:cpuset:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
                 {"cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cpu_limit(*v1) == 1
    # no quota anywhere (max, -1): the affinity decides
    assert cpu_limit(*_cgroup(tmp_path / "none", "0::/\n", {"cpu.max": "max 100000\n"})) == cpus
    assert cpu_limit(*_cgroup(tmp_path / "none1", "4:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n",
                                                                "cpu/cpu.cfs_period_us": "100000\n"})) == cpus


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to restrict the process to one")
def test_a_session_on_one_allowed_cpu_starts_no_extra_pool_thread() -> None:
    """Under `taskset -c 0`, ONNX Runtime's default pool had a thread per machine core all the same."""
    code = ("import os, sys; sys.path.insert(0, '.'); from tests import models; from optimizer.runtime import "
            "create_session, SessionSettings; before = len(os.listdir('/proc/self/task')); "
            "s = create_session(models.mlp().SerializeToString(), SessionSettings()); "
            "print(len(os.listdir('/proc/self/task')) - before)")
    cpu = sorted(os.sched_getaffinity(0))[0]
    done = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_compose_waits_for_healthy_replicas_and_the_cpu_image_pins_onnxruntime() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (dev extra) parses the compose files")
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["nginx"]["depends_on"] == {"api": {"condition": "service_healthy"}}
    for name in ("api", "worker"):  # threads settable for the whole stack from the shell, 0 (the CPU limit) by default
        assert services[name]["environment"]["ONNXFORGE_INTRA_OP_THREADS"] == "${ONNXFORGE_INTRA_OP_THREADS:-0}"
    text = (ROOT / "Dockerfile").read_text()
    version = re.search(r"^ARG ORT_VERSION=(\d+\.\d+\.\d+)$", text, re.M)
    assert version is not None
    cpu_build = text.split(" AS cpu-build\n", 1)[1].split("\nFROM ", 1)[0]
    assert '"onnxruntime==${ORT_VERSION}"' in cpu_build and "ARG ORT_VERSION" in cpu_build

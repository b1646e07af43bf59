"""Operator polish: nginx's retry rule, startup errors as one line, the worker's missing-store hint, /metrics for
operators, the CLI's bench names and help, thread sizing inside a container's CPU quota."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
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
    with _nginx(tmp_path / "a", [r.port for r in timed_out]) as url:
        answer = httpx.post(f"{url}/v1/models/m/predict", json={"inputs": {}}, timeout=30)
        assert answer.status_code == 504
        assert sum(r.hits for r in timed_out) == 1, "a predict past its time limit was replayed on another replica"
        assert "," not in answer.headers["X-Onnxforge-Upstream"]
    busy = [_Replica(503), _Replica(503)]
    with _nginx(tmp_path / "b", [r.port for r in busy]) as url:
        answer = httpx.post(f"{url}/v2/models/m/infer", json={"inputs": []}, timeout=30)
        assert answer.status_code == 503
        assert [r.hits for r in busy] == [1, 1]  # a busy replica's predict goes to the next one


def test_nginx_conf_never_retries_on_504() -> None:
    rules = re.findall(r"proxy_next_upstream\s+([^;]*);", (ROOT / "deploy" / "nginx.conf").read_text())
    assert rules and all("http_504" not in rule and "error" in rule for rule in rules), rules

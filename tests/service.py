"""Start the real service (`python -m app.cli serve`) on a free port of 127.0.0.1, for tests that talk HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import TEST_SETTINGS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(data_dir: Path, log_path: Path, *extra_args: str, **settings: Any) -> tuple[str, subprocess.Popen]:  # noqa: ANN401
    """Run the service with TEST_SETTINGS (+ `settings`) and wait until /readyz answers; returns (base URL, process).

    The caller owns the process (stop it when done); its output goes to `log_path`, quoted when it dies at start.
    A port that free_port() found free can be taken before the service binds it (another process's connection on
    a busy machine): the service is then started again on another port.
    """
    for _ in range(3):
        started = _start(data_dir, log_path, free_port(), extra_args, settings)
        if started is not None:
            return started
    raise AssertionError(f"the service found its port taken 3 times:\n{log_path.read_text()[-2000:]}")


def _start(data_dir: Path, log_path: Path, port: int, extra_args: tuple[str, ...],
           settings: dict[str, Any]) -> tuple[str, subprocess.Popen] | None:
    """One start on `port`: (base URL, process) once ready, None if the port was taken."""
    env = {**os.environ, **{f"ONNXFORGE_{k.upper()}": str(v) for k, v in {**TEST_SETTINGS, **settings}.items()}}
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                                    str(data_dir), *extra_args], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return base, process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            if "address already in use" in log_path.read_text():
                return None
            raise AssertionError(f"the service exited at start:\n{log_path.read_text()[-2000:]}")
        if time.monotonic() >= deadline:
            process.kill()
            raise AssertionError("the service did not become ready within 60 s")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """Whether `pid` still runs. A zombie does not: an orphan is reaped by PID 1 whenever that gets to it (and a
    container's PID 1 may never), so its /proc entry alone says nothing about whether it stopped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


@contextmanager
def running_service(tmp_path: Path, *extra_args: str, **settings: Any) -> Iterator[tuple[str, subprocess.Popen]]:  # noqa: ANN401
    """`start_service` with data and log under `tmp_path`; the process is killed when the block ends."""
    base, process = start_service(tmp_path / "data", tmp_path / "server.log", *extra_args, **settings)
    try:
        yield base, process
    finally:
        stop(process)


@contextmanager
def serving_models(tmp_path: Path, uploads: dict[str, tuple[Any, dict[str, str]]]) -> Iterator[str]:  # noqa: ANN401
    """The service without a worker (versions serve their original), each `uploads` name -> (onnx model, extra upload
    fields) uploaded; yields "127.0.0.1:port" (what tritonclient takes)."""
    with running_service(tmp_path, run_worker="false") as (base, _):
        for name, (model, fields) in uploads.items():
            files = {"file": ("model.onnx", model.SerializeToString(), "application/octet-stream")}
            response = httpx.post(f"{base}/v1/models", files=files, data={"name": name, **fields}, timeout=30)
            assert response.status_code == 202, response.text
        yield base.removeprefix("http://")

"""`onnxforge serve --workers 2` as the README installs it (`pip install -e .`, the console script), started from
another folder: the API processes must import our `optimizer` package, not ONNX Runtime's transformers/optimizer.py
(which ORT's transformers package puts on sys.path, and spawned processes inherit)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_SETTINGS
from tests.service import free_port, stop

SCRIPT = Path(sys.executable).parent / "onnxforge"


def _serve(tmp_path: Path, *args: str, **settings: object) -> tuple[str, subprocess.Popen, Path]:
    """The console script from `tmp_path` (not the repository), with `args`; (base URL, process, log) once ready."""
    if not SCRIPT.exists():
        pytest.skip(f"no console script at {SCRIPT} (the package is not installed in this venv)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({f"ONNXFORGE_{k.upper()}": str(v) for k, v in {**TEST_SETTINGS, **settings}.items()})
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(SCRIPT), "serve", "--no-worker", "--port", str(port), "--data-dir", str(tmp_path / "data"), *args],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return base, process, log
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline or "Error" in log.read_text():
            stop(process)
            raise AssertionError(f"not ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def test_workers_start_from_another_folder(tmp_path: Path) -> None:
    base, process, log = _serve(tmp_path, "--workers", "2")
    try:
        statuses = {httpx.get(f"{base}/v2", timeout=5).status_code for _ in range(4)}
        assert statuses == {200}
        assert "is not a package" not in log.read_text()
    finally:
        stop(process)

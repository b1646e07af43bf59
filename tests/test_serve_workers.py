"""`onnxforge serve --workers 2`: two API processes answer on one port, one optimizer worker beside them,
and SIGTERM stops them all. The real command, the real processes; /metrics says which process answered."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import httpx
import numpy as np

from optimizer.runtime import create_session, default_threads
from tests import models
from tests.service import alive, start_service, stop


def _children(pid: int) -> dict[int, str]:
    """The live child processes of `pid`: pid -> command line."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def _answering_pid(base: str) -> tuple[int, float]:
    """Which process answers a fresh connection, and how many predicts of model `m` it has counted."""
    text = httpx.get(f"{base}/metrics", timeout=10).text  # a new connection each time: the kernel picks a process
    pid = int(re.search(r'onnxforge_api_process\{pid="(\d+)"\} 1', text).group(1))
    # Summed over variants: the worker's job may finish meanwhile and a process loads the optimized one (CI once
    # saw a process answer only after that, so its "original" count stayed 0).
    ok = re.findall(r'onnxforge_predict_requests_total\{model="m",outcome="ok",[^}]*\} ([0-9.e+]+)', text)
    return pid, sum(float(count) for count in ok)


def test_two_api_processes_answer_one_worker_runs_and_sigterm_stops_all(tmp_path: Path) -> None:
    base, process = start_service(tmp_path / "data", tmp_path / "server.log", "--workers", "2", run_worker="true")
    try:
        children = _children(process.pid)
        workers = [pid for pid, cmd in children.items() if "app.worker" in cmd]
        assert len(workers) == 1, children  # one optimizer worker for the two API processes, not one each
        model = models.mlp()
        files = {"file": ("m.onnx", model.SerializeToString(), "application/octet-stream")}
        # fp32: the worker's job may finish mid-test and a process then serves the optimized variant; FP32 recipes
        # keep its answers equal to ONNX Runtime's on the original (an INT8 one, under auto, would not be).
        accepted = httpx.post(f"{base}/v1/models", files=files, data={"name": "m", "precision": "fp32"}, timeout=30)
        assert accepted.status_code == 202, accepted.text
        reference = create_session(model.SerializeToString())
        counted: dict[int, float] = {}
        # Until both processes have answered predicts (each loads its own session). By time, not by count: 400
        # requests once all went to one process while the other was still starting on a loaded machine.
        deadline, i = time.monotonic() + 60, 0
        while time.monotonic() < deadline:
            i += 1
            feed = models.random_feed(model, batch=1, seed=i)
            body = {"inputs": {"features": feed["features"].tolist()}}
            response = httpx.post(f"{base}/v1/models/m/predict", json=body, timeout=30)
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(np.asarray(response.json()["outputs"]["logits"], np.float32),
                                       reference.run(["logits"], feed)[0], rtol=1e-4, atol=1e-5)
            pid, ok = _answering_pid(base)
            counted[pid] = ok
            if len(counted) == 2 and all(v > 0 for v in counted.values()):
                break
        assert len(counted) == 2 and all(v > 0 for v in counted.values()), counted
        api = set(counted)
        assert api <= set(_children(process.pid)), "the answering processes are the parent's children"
        assert not api & set(workers)
        # The worker timed the variants with the threads each API process's sessions get (the cores shared out),
        # so the report's latencies are those of what serves (it timed with every core before).
        status_url = f"{base}{accepted.json()['status_url']}"
        deadline = time.monotonic() + 120
        while httpx.get(status_url, timeout=10).json()["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.2)
        report = httpx.get(f"{base}/v1/models/m/report", timeout=10).json()["report"]
        assert report["config"]["threads"] == max(1, default_threads() // 2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(40) == -signal.SIGTERM  # exits by the signal like one process (status 143); requests done
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in [*api, *workers]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in [*api, *workers] if alive(pid)]
    finally:
        stop(process)

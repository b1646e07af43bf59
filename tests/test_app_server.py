"""The real thing: `python -m app.cli serve` under uvicorn on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.store import Database, Job
from optimizer.runtime import create_session
from tests import models
from tests.conftest import npz
from tests.service import alive, running_service


@pytest.fixture
def server(tmp_path: Path):  # noqa: ANN201 - yields (base url, process, data dir)
    with running_service(tmp_path, "--log-level", "info") as (base, process):
        yield base, process, tmp_path / "data"


def test_served_over_http_from_upload_to_predict_and_clean_shutdown(server) -> None:  # noqa: ANN001
    base, process, data = server
    model = models.cnn()
    samples = np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)
    with httpx.Client(base_url=base, timeout=30) as client:
        accepted = client.post("/v1/models", files={
            "file": ("cnn.onnx", model.SerializeToString()), "calibration": ("images.npz", npz(image=samples)),
        }, data={"precision": "auto"})
        assert accepted.status_code == 202, accepted.text
        status_url = accepted.json()["status_url"]
        deadline = time.monotonic() + 90
        while (job := client.get(status_url).json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["status"] == "succeeded", job

        report = client.get("/v1/models/cnn/report").json()["report"]
        assert {v["name"] for v in report["variants"]} >= {report["baseline"], report["selected"]}

        feed = models.random_feed(model, batch=2, seed=3)
        expected = create_session(model.SerializeToString()).run(None, feed)[0]
        served = client.post("/v1/models/cnn/predict", json={"inputs": {"image": feed["image"].tolist()}}).json()
        got = np.asarray(served["outputs"]["logits"], np.float32)
        cosine = float(got.ravel() @ expected.ravel() / (np.linalg.norm(got) * np.linalg.norm(expected)))
        # "original" when the optimizer found nothing faster (it then serves the original and says so)
        assert served["variant"] == ("original" if report["selected"] == "original" else "optimized")
        assert cosine > 0.99

        bad = client.post("/v1/models/cnn/predict", json={"inputs": {"image": [[1.0, 2.0]]}})
        assert bad.status_code == 400 and "'image'" in bad.json()["error"]
        assert client.get("/docs").status_code == 200
        assert 'onnxforge_predict_requests_total{model="cnn",outcome="ok"' in client.get("/metrics").text

    db = Database(f"sqlite:///{data / 'onnxforge.db'}")
    with db.read() as session:
        worker_pid = int(session.get(Job, job["id"]).worker_id.split(":")[1])
    db.dispose()
    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so a supervisor sees why it stopped.
    assert process.wait(30) in (0, -signal.SIGTERM)
    log = (data.parent / "server.log").read_text()
    assert "Application shutdown complete" in log and "worker " in log and " stopped" in log
    deadline = time.monotonic() + 10
    while alive(worker_pid):
        assert time.monotonic() < deadline, "the worker outlived the service"
        time.sleep(0.05)


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_line_per_request_is_logged_at_debug_only(tmp_path: Path, level: str) -> None:
    """uvicorn's access log costs more event loop than the whole fast infer path; /metrics counts requests anyway."""
    with running_service(tmp_path, "--log-level", level, "--no-worker") as (base, _):  # no worker: a faster start
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        time.sleep(0.2)  # let the line reach the log
        log = (tmp_path / "server.log").read_text()
    assert ('"GET /v2/health/live HTTP/1.1" 200' in log) == (level == "debug"), log[-2000:]

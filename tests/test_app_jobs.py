"""The worker process: jobs succeed end to end, replace versions only when ready, and survive crashes,
kills, time limits, deletes and restarts without ever staying stuck in `running`.

Faults are made deterministic: where the job fails anyway, its model is one whose run never ends
(tests/hostile.model_that_hangs); where it must finish after the fault (a restart, a retry), the optimizer
child is frozen with SIGSTOP once the job runs, so it cannot finish before the fault is injected.
Where a test does not look at what the optimizer chose, its MLP is uploaded as fp32: auto's INT8 tries took
~3.7x the optimizer's time on it (median of 4 interleaved rounds on a loaded host).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import onnx
import pytest

from app.store import Job
from optimizer.runtime import create_session
from tests import hostile, models
from tests.conftest import Api, npz


def _runner_pid(api: Api, job_id: str) -> int:
    """The optimizer child's pid, as the worker recorded it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with api.services.db.read() as session:
            job = session.get(Job, job_id)
            if job.status == "running" and job.runner_pid:
                return job.runner_pid
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never started running")


def _freeze_runner(api: Api, job_id: str) -> int:
    pid = _runner_pid(api, job_id)
    os.kill(pid, signal.SIGSTOP)
    return pid


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


def _variant(api: Api, name: str, version: int) -> str:
    """What a ready version serves by default: "original" when its optimizer found nothing faster (it keeps the
    original then; on this loaded machine an MLP's recipes can measure within the noise margin), else "optimized"."""
    return "original" if api.client.get(f"/v1/models/{name}/versions/{version}").json()["selected"] == "original" \
        else "optimized"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_upload_optimize_report_and_predict(serve) -> None:  # noqa: ANN001
    model = models.mlp()
    samples = np.random.default_rng(1).normal(size=(32, 64)).astype(np.float32)
    with serve() as api:
        accepted = api.upload(model, "mlp.onnx", calibration=npz(features=samples))
        assert accepted.status_code == 202, accepted.text
        job = api.wait(accepted.json()["job_id"])
        assert job["status"] == "succeeded", job
        assert (job["stage"], job["progress"], job["attempts"], job["error"]) == (None, 1.0, 1, None)
        assert job["started_at"] <= job["finished_at"]

        described = api.client.get("/v1/models/mlp").json()
        assert (described["serving_version"], described["serving_variant"]) == (1, _variant(api, "mlp", 1))
        version = described["versions"][0]
        assert version["status"] == "ready" and version["provider"] == "cpu" and version["has_calibration"]

        body = api.client.get("/v1/models/mlp/report").json()
        report = body["report"]
        assert body["selected"] == report["selected"] == version["selected"]
        variants = {v["name"]: v for v in report["variants"]}
        assert variants[report["baseline"]]["latency_ms"]["p50"] > 0
        assert variants[report["selected"]]["latency_ms"]["p50"] > 0
        assert report["speedup_p50"] > 0 and report["provider"] == "cpu"
        assert report["calibration"]["synthetic"] is False

        feed = models.random_feed(model, batch=3, seed=5)
        expected = create_session(model.SerializeToString()).run(None, feed)[0]
        served = api.predict("mlp", feed).json()
        assert served["variant"] == _variant(api, "mlp", 1)
        got = np.asarray(served["outputs"]["logits"], np.float32)
        assert got.shape == expected.shape
        assert _cosine(got, expected) > 0.99  # what the optimizer's accuracy gate promises
        assert (got.argmax(1) == expected.argmax(1)).all()
        original = np.asarray(api.predict("mlp", feed, variant="original").json()["outputs"]["logits"])
        np.testing.assert_allclose(original, expected, rtol=1e-5, atol=1e-5)

        optimized = api.client.get("/v1/models/mlp/artifact?variant=optimized")
        assert optimized.status_code == 200
        onnx.checker.check_model(onnx.load_from_string(optimized.content))
        assert api.client.get("/readyz").json()["worker"] == "running"


def test_a_new_version_serves_only_once_ready(serve) -> None:  # noqa: ANN001
    old, new = models.mlp(seed=1), models.mlp(seed=2)
    feed = models.random_feed(old, batch=2)
    old_out = create_session(old.SerializeToString()).run(None, feed)[0]
    new_out = create_session(new.SerializeToString()).run(None, feed)[0]
    with serve() as api:
        assert api.wait(api.upload(old, name="m", precision="fp32").json()["job_id"])["status"] == "succeeded"
    with serve(run_worker=False) as api:  # no worker: version 2 stays queued
        second = api.upload(new, name="m", precision="fp32").json()
        served = api.predict("m", feed).json()
        assert (served["version"], served["variant"]) == (1, _variant(api, "m", 1))
        assert _cosine(np.asarray(served["outputs"]["logits"]), old_out) > 0.99
        pinned = api.predict("m", feed, version=2).json()
        assert (pinned["version"], pinned["variant"]) == (2, "original")
        np.testing.assert_allclose(np.asarray(pinned["outputs"]["logits"]), new_out, rtol=1e-5, atol=1e-5)
    with serve() as api:  # the queued job survived the restart and runs now
        assert api.wait(second["job_id"])["status"] == "succeeded"
        served = api.predict("m", feed).json()
        assert (served["version"], served["variant"]) == (2, _variant(api, "m", 2))
        assert _cosine(np.asarray(served["outputs"]["logits"]), new_out) > 0.99


def test_a_failed_version_never_replaces_the_serving_one(serve) -> None:  # noqa: ANN001
    feed = models.random_feed(models.mlp(), batch=1)
    with serve() as api:
        first = api.upload(models.mlp(seed=1), name="m", precision="fp32").json()["job_id"]
        assert api.wait(first)["status"] == "succeeded"
    with serve(job_time_limit_s=1.5) as api:
        second = api.upload(hostile.model_that_hangs(), name="m").json()["job_id"]
        assert api.wait(second)["status"] == "failed"
        served = api.predict("m", feed).json()
        assert (served["version"], served["variant"]) == (1, _variant(api, "m", 1))
        described = api.client.get("/v1/models/m").json()
        assert described["serving_version"] == 1
        assert [v["status"] for v in described["versions"]] == ["ready", "failed"]
        refused = api.predict("m", feed, version=2, variant="optimized")  # its original would serve (and hang)
        assert refused.status_code == 409 and "optimization failed" in refused.json()["error"]


def test_shutdown_mid_job_requeues_it_and_the_next_start_finishes_it(serve) -> None:  # noqa: ANN001
    with serve() as api:
        job_id = api.upload(models.mlp(), name="m", precision="fp32").json()["job_id"]
        runner = _freeze_runner(api, job_id)
    assert _gone(runner), "the optimizer child outlived the service"
    with serve(run_worker=False) as api:
        job = api.job(job_id)
        assert (job["status"], job["attempts"]) == ("queued", 0), job
        assert "shutdown" in job["error"]
    with serve() as api:
        job = api.wait(job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job


def test_worker_killed_mid_job_is_replaced_and_the_job_retried(serve) -> None:  # noqa: ANN001
    with serve() as api:
        job_id = api.upload(models.mlp(), name="m", precision="fp32").json()["job_id"]
        runner = _freeze_runner(api, job_id)
        worker_pid = api.services.worker.pid
        os.kill(worker_pid, signal.SIGKILL)
        assert _gone(runner), "the optimizer child outlived its worker"
        job = api.wait(job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 2), job
        assert api.services.worker.pid != worker_pid and api.services.worker.restarts == 1


def test_worker_killed_on_the_last_attempt_fails_the_job_with_the_reason(serve) -> None:  # noqa: ANN001
    with serve(job_max_attempts=1) as api:
        job_id = api.upload(hostile.model_that_hangs(), name="m").json()["job_id"]
        runner = _runner_pid(api, job_id)
        os.kill(api.services.worker.pid, signal.SIGKILL)
        assert _gone(runner), "the optimizer child outlived its worker"
        job = api.wait(job_id)
        assert job["status"] == "failed"
        assert "stopped 1 times" in job["error"] and "Upload the model again" in job["error"]
        version = api.client.get("/v1/models/m").json()["versions"][0]
        assert (version["status"], version["error"]) == ("failed", job["error"])


def test_optimizer_crash_fails_only_its_job(serve) -> None:  # noqa: ANN001
    with serve() as api:
        crashed = api.upload(hostile.model_that_hangs(), name="crash").json()["job_id"]
        worker_pid = api.services.worker.pid
        os.kill(_runner_pid(api, crashed), signal.SIGKILL)  # as if ONNX Runtime segfaulted
        job = api.wait(crashed)
        assert job["status"] == "failed"
        assert "killed by SIGKILL" in job["error"] and "the service kept running" in job["error"]
        healthy = api.upload(models.mlp(seed=3), name="fine", precision="fp32").json()["job_id"]
        assert api.wait(healthy)["status"] == "succeeded"
        assert api.services.worker.pid == worker_pid  # the same worker took the next job


def test_job_over_its_time_limit_is_stopped_and_failed(serve) -> None:  # noqa: ANN001
    with serve(job_time_limit_s=1.5) as api:
        job_id = api.upload(hostile.model_that_hangs(), name="slow").json()["job_id"]
        runner = _runner_pid(api, job_id)
        job = api.wait(job_id)
        assert job["status"] == "failed"
        assert "time limit of 1.5 s" in job["error"]
        assert _gone(runner)
        # its only version failed to optimize: its original still serves (and would hang), never an optimized one
        described = api.client.get("/v1/models/slow").json()
        assert (described["serving_version"], described["serving_variant"]) == (1, "original")
        refused = api.predict("slow", {"x": [[1.0]]}, variant="optimized")
        assert refused.status_code == 409 and "optimization failed" in refused.json()["error"]


def test_deleting_a_model_mid_job_stops_the_job_and_leaves_no_files(serve) -> None:  # noqa: ANN001
    with serve() as api:
        job_id = api.upload(hostile.model_that_hangs(), name="doomed").json()["job_id"]
        runner = _runner_pid(api, job_id)
        assert api.client.delete("/v1/models/doomed").status_code == 200
        job = api.job(job_id)
        assert (job["status"], job["error"]) == ("failed", "the model version was deleted")
        assert _gone(runner), "the worker did not stop the deleted model's optimization"
        assert not (api.services.settings.artifacts_dir / "models/doomed/1").exists()
        after = api.upload(models.mlp(), name="next", precision="fp32").json()["job_id"]
        assert api.wait(after)["status"] == "succeeded"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_precision_choice_reaches_the_optimizer(serve, precision: str) -> None:  # noqa: ANN001
    with serve() as api:
        job_id = api.upload(models.mlp(), name="p", precision=precision).json()["job_id"]
        assert api.wait(job_id)["status"] == "succeeded"
        report = api.client.get("/v1/models/p/report").json()["report"]
        assert report["config"]["precision"] == precision

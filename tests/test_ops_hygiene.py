"""Ops hygiene from a platform engineer's review: info log lines an operator can search, settings refused or warned
about at startup, process metrics on /metrics, work folders a killed worker left, an explicit CUDA request that
cannot be met."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.services.jobs import JobQueue, new_worker_id
from app.settings import Settings
from app.worker.loop import Worker
from optimizer.runtime import CPU, CUDA, cuda_is_usable, cuda_unavailable_reason, resolve_provider
from tests import models
from tests.conftest import TEST_SETTINGS, npz
from tests.service import running_service

ROOT = Path(__file__).resolve().parent.parent


def _cli(argv: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """The real `onnxforge` command in its own process, with only the given ONNXFORGE_* variables."""
    env = {**{k: v for k, v in os.environ.items() if not k.upper().startswith("ONNXFORGE_")},
           "ONNXFORGE_DATA_DIR": str(tmp_path / "data"), **env}
    return subprocess.run([sys.executable, "-m", "app.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def _one_error_line(done: subprocess.CompletedProcess, said: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {said}"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# -- 1. one info line per upload, delete and pin; the worker's last line about a job names it all ------------


def test_uploads_deletes_pins_and_job_ends_are_logged_at_info(serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="onnxforge")
    model = models.mlp()
    samples = npz(features=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    with serve(run_worker=False) as api:
        accepted = api.upload(model, "ranker.onnx", samples, precision="fp32")
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        upload = [line for line in lines if job_id in line]
        assert len(upload) == 1, lines
        size = len(model.SerializeToString())
        assert "'ranker' version 1" in upload[0] and f"{size} bytes" in upload[0], upload
        assert f"calibration {len(samples)} bytes" in upload[0] and "precision fp32" in upload[0], upload

        worker = Worker(api.services.settings, db=api.services.db, store=api.services.store)
        assert worker.run_once()
        for thread in worker._running:
            thread.join(120)
        assert api.job(job_id)["status"] == "succeeded"
        selected = api.client.get("/v1/models/ranker").json()["versions"][0]["selected"]
        end = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {job_id}:")][-1]
        assert "model 'ranker' version 1 succeeded after " in end and f"variant {selected!r} selected" in end, end

        caplog.clear()
        assert api.client.put("/v1/models/ranker/serving", json={"version": 1}).status_code == 200
        assert api.client.delete("/v1/models/ranker/serving").status_code == 200
        assert api.upload(model, "ranker.onnx").status_code == 202
        assert api.client.delete("/v1/models/ranker/versions/2").status_code == 200
        assert api.client.delete("/v1/models/ranker").status_code == 200
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert "model 'ranker' pinned to version 1; version 1 serves" in said, said
        assert "model 'ranker' unpinned; version 1 serves" in said, said
        assert "deleted model 'ranker' version 2" in said, said
        assert "deleted model 'ranker': all its versions (1)" in said, said


# -- 2. bad or misspelt settings at startup ---------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "env", "said"), [
    (["serve"], {"ONNXFORGE_LOG_LEVEL": "verbose"},
     "ONNXFORGE_LOG_LEVEL: Input should be 'debug', 'info', 'warning' or 'error' (got 'verbose')"),
    (["worker"], {"ONNXFORGE_JOB_LEASE_S": "0.01"}, "ONNXFORGE_JOB_LEASE_S: must be from 3 to 3600 seconds"),
    (["worker"], {"ONNXFORGE_WORKER_POLL_S": "100000"}, "ONNXFORGE_WORKER_POLL_S: must be from 0.05 to 60 seconds"),
])
def test_bad_settings_are_one_error_line(argv: list[str], env: dict[str, str], said: str, tmp_path: Path) -> None:
    _one_error_line(_cli(argv, env, tmp_path), said)


def test_log_level_in_capitals_is_accepted() -> None:
    assert Settings(log_level="WARNING").log_level == "warning"


def test_a_misspelt_variable_is_warned_about_naming_the_closest_setting(tmp_path: Path) -> None:
    with running_service(tmp_path, run_worker=False, maxmodelbytes=10, log_level="info") as (base, process):
        log = (tmp_path / "server.log").read_text()
    warned = [line for line in log.splitlines() if "ONNXFORGE_MAXMODELBYTES" in line]
    assert len(warned) == 1, log
    assert "WARNING" in warned[0] and "did you mean ONNXFORGE_MAX_MODEL_BYTES?" in warned[0], warned
    assert not [line for line in log.splitlines() if "is not a setting" in line and line not in warned], log


# -- 3. process memory, CPU and file descriptors on /metrics ------------------------------------------------------


def test_metrics_show_the_process_memory_cpu_and_open_files(serve) -> None:
    with serve(run_worker=False) as api:
        text = api.client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["process_resident_memory_bytes"] > 10 * 2**20, text
    assert values["process_open_fds"] > 0 and "process_cpu_seconds_total" in values, text
    assert any(name.startswith("python_info") for name in values), text


# -- 4. the work folders of jobs that are over are removed when a worker starts -----------------------------------


def test_a_starting_worker_removes_only_the_work_folders_of_jobs_that_are_over(serve, data_dir: Path) -> None:
    with serve(run_worker=False) as api:
        ids = [api.upload(models.mlp(seed=i), f"m{i}.onnx").json()["job_id"] for i in range(3)]
        other = JobQueue(api.services.db, lease_s=3600, max_attempts=2)  # another worker, alive on this host
        other_id = new_worker_id()
        failed = other.claim(other_id)
        assert failed is not None and failed.id == ids[0]
        assert other.fail(failed, other_id, "stopped by the test")
        running = other.claim(other_id)
        assert running is not None and running.id == ids[1]
        work = api.services.settings.work_dir
        gone = "0" * 32  # a job no longer in the database (its model deleted)
        for job_id in (*ids, gone):
            (work / job_id / "out").mkdir(parents=True)
            (work / job_id / "out" / "model.onnx").write_bytes(b"x" * 1000)
        # capped at the one job running: this worker sweeps but claims nothing (no optimizer child in this test)
        settings = Settings(**{**TEST_SETTINGS, "data_dir": data_dir, "max_concurrent_jobs": 1})
        worker = Worker(settings, db=api.services.db, store=api.services.store)
        assert worker.run_once() is False
        assert sorted(p.name for p in work.iterdir()) == sorted([ids[1], ids[2]])  # running, and queued
        assert (work / ids[1] / "out" / "model.onnx").exists()
        assert api.job(ids[2])["status"] == "queued"


# -- 5. CUDA asked for by name must be there; auto still falls back ----------------------------------------------


def test_cuda_reason_names_which_piece_is_missing(tmp_path: Path) -> None:
    assert cuda_unavailable_reason([CUDA, CPU], session_works=True) is None
    assert "no NVIDIA GPU is visible" in cuda_unavailable_reason([CUDA, CPU], session_works=False, dev=tmp_path)
    (tmp_path / "nvidia0").touch()
    assert "CUDA or cuDNN libraries" in cuda_unavailable_reason([CUDA, CPU], session_works=False, dev=tmp_path)
    assert "install onnxruntime-gpu" in cuda_unavailable_reason([CPU])


@pytest.mark.skipif(cuda_is_usable(), reason="CUDA works here: an explicit cuda request is met")
@pytest.mark.parametrize(("argv", "env", "said"), [
    (["serve"], {"ONNXFORGE_PROVIDERS": "cuda"}, "ONNXFORGE_PROVIDERS=cuda cannot be met: "),
    (["worker", "--providers", "cuda"], {}, "--providers=cuda cannot be met: "),
])
def test_an_explicit_cuda_request_that_cannot_be_met_stops_startup(argv: list[str], env: dict[str, str], said: str,
                                                                   tmp_path: Path) -> None:
    done = _cli(argv, env, tmp_path)
    _one_error_line(done, said)
    assert cuda_unavailable_reason() in done.stderr  # why: here, the CPU build of ONNX Runtime is installed
    assert "auto" in done.stderr


@pytest.mark.skipif(cuda_is_usable(), reason="CUDA works here")
def test_auto_still_serves_on_cpu_where_cuda_is_missing(tmp_path: Path) -> None:
    assert resolve_provider("auto") == "cpu"
    with running_service(tmp_path, run_worker=False, providers="auto", log_level="info"):
        log = (tmp_path / "server.log").read_text()
    assert "sessions on cpu" in log and "error" not in log.lower(), log

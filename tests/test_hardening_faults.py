"""Faults beyond tests/test_app_jobs.py (which covers SIGKILL of the worker and of the optimizer child):
the disk filling up while the optimizer writes its artifact.

The disk is a small tmpfs mounted for the test (needs root, as CI runs; skipped otherwise).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import models
from tests.test_app_jobs import _freeze_runner


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_disk(disk: Path) -> Path:
    """Take every free byte of the disk."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, stat.f_bavail * stat.f_frsize)
        while True:  # whatever fallocate left (rounding), a page at a time
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def test_disk_full_while_writing_the_artifact_fails_the_job_and_the_old_version_serves(
        serve, small_disk: Path, tmp_path: Path) -> None:  # noqa: ANN001
    # The database lives elsewhere, as in any real deployment: only the artifact store fills up.
    with serve(data_dir=small_disk / "data", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}") as api:
        assert api.wait(api.upload(models.mlp(), name="m").json()["job_id"])["status"] == "succeeded"
        feed = models.random_feed(models.mlp(), batch=2)
        expected = api.predict("m", feed).json()["outputs"]

        job_id = api.upload(models.mlp(hidden=512, seed=2), name="m").json()["job_id"]
        runner = _freeze_runner(api, job_id)
        filler = fill_disk(small_disk)
        os.kill(runner, signal.SIGCONT)
        job = api.wait(job_id)
        assert job["status"] == "failed", job
        assert "the disk ran full" in job["error"] and "No space left on device" in job["error"], job["error"]

        served = api.predict("m", feed)
        assert served.status_code == 200 and served.json()["version"] == 1
        assert served.json()["outputs"] == expected
        version_dir = api.services.settings.artifacts_dir / "models/m/2"
        assert not (version_dir / "optimized.onnx").exists(), "a half-written artifact was stored"
        assert not list((api.services.settings.work_dir).glob("*/out/model.onnx")), "scratch output left behind"

        filler.unlink()
        again = api.upload(models.mlp(seed=3), name="m").json()["job_id"]
        assert api.wait(again)["status"] == "succeeded"
        assert api.predict("m", feed).json()["version"] == 3

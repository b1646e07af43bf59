"""Max concurrent jobs, on the real worker: `worker_concurrency` optimizer children per worker process,
and `max_concurrent_jobs` across every worker sharing the database (checked in the claim).

Whether jobs ran at once is read from the database's own timestamps (started_at, finished_at).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import text, update

from app.services.jobs import _CLAIM_LOCK_KEY, JobQueue, worker_host
from app.settings import Settings
from app.store import Database, Job, utcnow
from app.worker.embedded import SETTINGS_ENV
from tests import hostile, models
from tests.conftest import Api
from tests.test_app_queue import _add_jobs, _db


def _intervals(api: Api, job_ids: list[str]) -> list[tuple[datetime, datetime]]:
    with api.services.db.read() as session:
        jobs = [session.get(Job, job_id) for job_id in job_ids]
    assert all(job.status == "succeeded" and job.attempts == 1 for job in jobs), [(j.status, j.error) for j in jobs]
    return sorted((job.started_at, job.finished_at) for job in jobs)


def _overlap(intervals: list[tuple[datetime, datetime]]) -> bool:
    return any(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:], strict=False))


def _upload_two(api: Api) -> list[str]:
    return [api.upload(models.mlp(seed=seed), name=f"m{seed}", precision="fp32").json()["job_id"] for seed in (1, 2)]


@contextmanager
def _second_worker(settings: Settings) -> Iterator[subprocess.Popen]:
    """Another worker process on the same database (as `onnxforge worker` on another container would be)."""
    env = {**os.environ, SETTINGS_ENV: settings.model_dump_json()}
    process = subprocess.Popen([sys.executable, "-m", "app.worker", "--parent-pid", str(os.getpid())], env=env)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(20)


def test_a_global_cap_of_two_lets_two_jobs_run_at_once(serve) -> None:  # noqa: ANN001
    # Models whose run never ends: two MLP jobs overlapped only if the second was claimed before the first finished.
    with serve(worker_concurrency=2, max_concurrent_jobs=2) as api:
        job_ids = [api.upload(hostile.model_that_hangs(), name=f"m{n}").json()["job_id"] for n in (1, 2)]
        for job_id in job_ids:
            api.wait(job_id, until=lambda job: job["status"] == "running")
        with api.services.db.read() as session:  # both at one moment
            jobs = [session.get(Job, job_id) for job_id in job_ids]
        assert [(job.status, job.attempts) for job in jobs] == [("running", 1)] * 2


def test_global_cap_of_one_holds_across_two_workers_with_two_slots_each(serve) -> None:  # noqa: ANN001
    with serve(worker_concurrency=2, max_concurrent_jobs=1) as api, _second_worker(api.services.settings):
        job_ids = _upload_two(api)
        for job_id in job_ids:
            api.wait(job_id)
        intervals = _intervals(api, job_ids)
    assert not _overlap(intervals), intervals


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """An empty queue on SQLite, and on the local PostgreSQL (skipped without one, as in test_scale_out)."""
    if request.param == "sqlite":
        return _db(tmp_path)
    db = Database(request.getfixturevalue("new_database")())
    db.create_schema()
    return db


@pytest.mark.parametrize("cap", [1, 3])
def test_racing_claimers_never_exceed_the_global_cap(queue_db: Database, cap: int) -> None:
    db = queue_db
    _add_jobs(db, 12)
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def work(n: int) -> None:
        queue = JobQueue(Database(db.url), lease_s=30, max_attempts=2, max_running=cap)  # its own connections
        barrier.wait()
        for _ in range(5):
            job = queue.claim(f"{worker_host()}:0:w{n}")
            if job is not None:
                with lock:
                    claimed.append(job.id)
        queue.db.dispose()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(claimed) == cap
    assert JobQueue(db, 30, 2).counts()["running"] == cap
    db.dispose()


def test_a_claim_that_waited_for_the_lock_starts_after_the_job_that_finished_meanwhile(queue_db: Database) -> None:
    """A claimer that read the clock, then waited for the database's write lock (SQLite's busy handler, the
    claim lock on PostgreSQL) while another job finished, must not record a start before that finish: the
    start is read once the lock is held. (A claim stamped with its clock reading before the wait made the
    global-cap test see two jobs overlap that never ran at once.)"""
    db = queue_db
    first_id, second_id = _add_jobs(db, 2)
    first = JobQueue(db, lease_s=30, max_attempts=2, max_running=1).claim("host:1:a")
    assert first is not None and first.id == first_id
    claimed: list[str | None] = []
    other = JobQueue(Database(db.url), lease_s=30, max_attempts=2, max_running=1)
    with db.write() as held:  # another transaction holds the write (claim) lock...
        if db.is_sqlite:
            held.execute(text("UPDATE jobs SET progress = progress WHERE id = :id"), {"id": first_id})
        else:
            held.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CLAIM_LOCK_KEY})
        claimer = threading.Thread(target=lambda: claimed.append(getattr(other.claim("host:2:b"), "id", None)))
        claimer.start()
        claimer.join(0.5)  # ...while the second worker tries to claim (it waits for the lock)
        assert claimed == []
        held.execute(update(Job).where(Job.id == first_id).values(status="succeeded", finished_at=utcnow(),
                                                                  lease_expires_at=None))
    claimer.join(30)
    other.db.dispose()
    assert claimed == [second_id]
    with db.read() as session:
        finished = session.get(Job, first_id).finished_at
        started = session.get(Job, second_id).started_at
    assert started >= finished, (started, finished)
    db.dispose()


def test_stopping_a_worker_with_two_jobs_running_puts_both_back_in_the_queue(serve) -> None:  # noqa: ANN001
    # Models whose run never ends: a job that finished before the stop (an MLP did, in CI) would make this race.
    with serve(worker_concurrency=2) as api:
        job_ids = [api.upload(hostile.model_that_hangs(), name=f"m{n}").json()["job_id"] for n in (1, 2)]
        for job_id in job_ids:
            api.wait(job_id, until=lambda job: job["status"] == "running")
    with serve(run_worker=False) as api:
        for job_id in job_ids:
            job = api.job(job_id)
            assert (job["status"], job["attempts"]) == ("queued", 0), job
            assert "shutdown" in job["error"]

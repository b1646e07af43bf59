"""The job queue on the database: exclusive claims, lost-worker recovery, and no write by a worker
that lost its job. Real SQLite files, one engine per simulated worker."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from app.services.jobs import JobQueue, worker_host, worker_is_dead
from app.store import Database, Job, ModelVersion, utcnow


def _db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'queue.db'}")
    db.create_schema()
    return db


def _add_jobs(db: Database, n: int) -> list[str]:
    ids = []
    with db.write() as session:
        for i in range(n):
            version = ModelVersion(name=f"m{i}", version=1, status="optimizing", filename="m.onnx", sha256="0" * 64,
                                   size_bytes=1)
            session.add(version)
            session.flush()
            job = Job(version_id=version.id, name=version.name, version=1)
            session.add(job)
            session.flush()
            ids.append(job.id)
    return ids


def test_concurrent_workers_never_claim_a_job_twice(tmp_path: Path) -> None:
    db = _db(tmp_path)
    expected = _add_jobs(db, 40)
    claimed: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        queue = JobQueue(Database(db.url), lease_s=30, max_attempts=2)  # its own engine and connections
        while (job := queue.claim(f"{worker_host()}:0:w{n}")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(expected)  # each job exactly once
    assert JobQueue(db, 30, 2).counts() == {"queued": 0, "running": 40, "succeeded": 0, "failed": 0}


def _set(db: Database, job_id: str, **values) -> None:  # noqa: ANN003
    with db.write() as session:
        job = session.get(Job, job_id)
        for key, value in values.items():
            setattr(job, key, value)


def _get(db: Database, job_id: str) -> Job:
    with db.read() as session:
        return session.get(Job, job_id)


def test_recovery_requeues_then_fails_jobs_whose_worker_is_gone(tmp_path: Path) -> None:
    db = _db(tmp_path)
    live, expired, exhausted = _add_jobs(db, 3)
    queue = JobQueue(db, lease_s=30, max_attempts=2)
    for _ in range(3):
        assert queue.claim("elsewhere:1:abc") is not None  # another host: judged by its lease alone
    past = utcnow() - timedelta(seconds=1)
    _set(db, expired, lease_expires_at=past)
    _set(db, exhausted, lease_expires_at=past, attempts=2, stage="quantize")

    actions = dict(queue.recover_lost())
    assert actions == {expired: "requeued", exhausted: "failed"}
    assert _get(db, live).status == "running"
    requeued = _get(db, expired)
    assert (requeued.status, requeued.worker_id, requeued.attempts) == ("queued", None, 1)
    assert "lost its worker" in requeued.error
    failed = _get(db, exhausted)
    assert failed.status == "failed" and "stopped 2 times" in failed.error and "'quantize'" in failed.error
    with db.read() as session:
        assert session.get(ModelVersion, failed.version_id).status == "failed"
    assert queue.claim("elsewhere:2:def").id == expired  # and it runs again


def test_a_dead_local_worker_is_recovered_before_its_lease_ends(tmp_path: Path) -> None:
    db = _db(tmp_path)
    (job_id,) = _add_jobs(db, 1)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_worker = f"{worker_host()}:{finished.stdout.strip()}:abc"
    assert worker_is_dead(dead_worker)
    assert not worker_is_dead(f"{worker_host()}:1:abc")  # pid 1 lives
    queue = JobQueue(db, lease_s=3600, max_attempts=2)
    queue.claim(dead_worker)
    assert queue.recover_lost() == [(job_id, "requeued")]


def test_a_worker_that_lost_its_job_cannot_record_an_outcome(tmp_path: Path) -> None:
    db = _db(tmp_path)
    _add_jobs(db, 1)
    queue = JobQueue(db, lease_s=30, max_attempts=3)
    first = queue.claim("elsewhere:1:a")
    _set(db, first.id, lease_expires_at=utcnow() - timedelta(seconds=1))
    queue.recover_lost()
    second = queue.claim("elsewhere:2:b")
    assert second.id == first.id and second.attempt == 2
    assert not queue.heartbeat(first.id, "elsewhere:1:a")
    assert not queue.succeed(first, "elsewhere:1:a", report={}, selected="x", provider="cpu")
    assert not queue.fail(first, "elsewhere:1:a", "late")
    assert queue.succeed(second, "elsewhere:2:b", report={"ok": 1}, selected="fused", provider="cpu")
    with db.read() as session:
        version = session.get(ModelVersion, second.version_id)
        assert (version.status, version.selected, version.report) == ("ready", "fused", {"ok": 1})


@pytest.mark.parametrize("worker_id", [None, "", "elsewhere:123:x", "garbage"])
def test_unknown_workers_are_judged_by_their_lease(worker_id: str | None) -> None:
    assert worker_is_dead(worker_id) is (not worker_id)


def test_a_worker_of_the_same_host_name_in_another_pid_namespace_is_judged_by_its_lease() -> None:
    """Two worker containers sharing a host name: a pid not alive here says nothing about the other namespace's
    worker (by host name alone, its running job was requeued and ran twice; deploy review, 2026-11-28)."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_here = finished.stdout.strip()
    assert worker_is_dead(f"{worker_host()}:{dead_here}:abc")  # this namespace: certainly dead
    assert worker_host().startswith(f"{socket.gethostname()}~")  # Linux: the namespace is part of the host
    other_namespace = f"{socket.gethostname()}~1:{dead_here}:abc"
    assert not worker_is_dead(other_namespace)

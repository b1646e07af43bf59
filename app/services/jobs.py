"""The job queue: rows in the database that workers claim, renew and finish.

Claiming is one code path for both databases: `SELECT ... FOR UPDATE SKIP LOCKED` (PostgreSQL lets
many workers take different jobs at once; SQLite ignores the clause and serializes writers with
BEGIN IMMEDIATE), then a conditional UPDATE that only succeeds on a row still queued.

A global cap on running jobs (settings.max_concurrent_jobs, across every worker on the database) is
checked in the same transaction as the claim: claimers first take a transaction-scoped advisory lock
on PostgreSQL (SKIP LOCKED alone would let two workers each count N-1 running jobs and both claim);
SQLite's BEGIN IMMEDIATE already serializes them.

A running job holds a lease its worker renews with every heartbeat. Every later write by the worker
is conditional on still owning the job (same worker id, still running), so a worker that was
presumed dead and whose job went to another worker cannot overwrite the other's result.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, text, update

from app.errors import NotFoundError
from app.store import Database, Job, ModelVersion, WorkerBeat, utcnow

ACTIVE = ("queued", "running")
_CLAIM_LOCK_KEY = 0x6F6E6E78636C6D  # pg_advisory_xact_lock key serializing capped claims ("onnxclm")
#: A worker beats every 2 s (app/worker/loop.py); one not heard from this long is not counted as present.
WORKER_SEEN_WITHIN_S = 15.0
_FORGET_WORKERS_AFTER = timedelta(days=1)  # rows of workers gone this long are deleted


def worker_host() -> str:
    """The host name, and the process-id namespace when there is one: "host~namespace".

    WHY the namespace: two worker containers given one host name (`network_mode: host`, a fixed `hostname:`) each
    see pid numbers of their own; by host name alone, one took the other's running job for dead (its pid was not
    alive in its own namespace) and queued it again, so the job ran twice. Another namespace is another host here:
    judged by its lease."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc (not Linux): the host name alone
        return socket.gethostname()
    return f"{socket.gethostname()}~{namespace}"


def new_worker_id() -> str:
    """host:pid:nonce (host: `worker_host`); the host and pid let a worker of the same host and pid namespace see
    that another is dead."""
    return f"{worker_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def worker_is_dead(worker_id: str | None) -> bool:
    """True only when the worker certainly is dead: it ran on this host and its process is gone.

    Workers on other hosts are judged by their lease alone.
    """
    if not worker_id:
        return True
    host, _, rest = worker_id.partition(":")
    pid_text = rest.partition(":")[0]
    if host != worker_host() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child that its parent has not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    version_id: str
    name: str
    version: int
    attempt: int
    options: dict[str, Any]
    has_calibration: bool


class JobQueue:
    def __init__(self, db: Database, lease_s: float, max_attempts: int, max_running: int = 0) -> None:
        self.db = db
        self.lease = timedelta(seconds=lease_s)
        self.max_attempts = max_attempts
        self.max_running = max_running  # global cap on running jobs; 0 = none

    # -- reads (API) --------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        with self.db.read() as session:
            job = session.get(Job, job_id)
        if job is None:
            raise NotFoundError(f"no job {job_id!r}")
        return job

    def counts(self) -> dict[str, int]:
        """Jobs by status, every status present (for /metrics)."""
        with self.db.read() as session:
            rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        counts = dict.fromkeys(("queued", "running", "succeeded", "failed"), 0)
        counts.update({status: n for status, n in rows})
        return counts

    def workers_seen(self, within_s: float = WORKER_SEEN_WITHIN_S) -> int:
        """How many workers, on any host, beat in the last `within_s` seconds."""
        since = utcnow() - timedelta(seconds=within_s)
        with self.db.read() as session:
            return session.scalar(select(func.count()).select_from(WorkerBeat).where(WorkerBeat.last_seen >= since))

    def oldest_queued_s(self) -> float:
        """Age in seconds of the oldest queued job since its upload, 0 when none is queued (for /metrics)."""
        with self.db.read() as session:
            oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status == "queued"))
        return max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0

    def lost_worker(self, job: Job) -> str | None:
        """What a running job's view says when its worker has stopped beating, None while it beats (or the job is
        not running). WHY: the job read "running", progress frozen, until its lease ended and a worker requeued it,
        and for ever with no worker left to do that. The job is not taken from the worker here: one on another host
        may only be cut off from the database, and the lease is what keeps two workers off one job."""
        if job.status != "running":
            return None
        with self.db.read() as session:
            beat = session.get(WorkerBeat, job.worker_id) if job.worker_id else None
        now = utcnow()
        renewed = job.lease_expires_at - self.lease if job.lease_expires_at is not None else None
        heard = max((t for t in (renewed, beat.last_seen if beat is not None else None) if t is not None),
                    default=job.started_at)
        gone = worker_is_dead(job.worker_id)
        # the longest a live worker stays silent: it beats every 2 s or each poll (<= 60 s), renews every lease/3
        silent_after = timedelta(seconds=max(WORKER_SEEN_WITHIN_S, 2 * min(60.0, self.lease.total_seconds() / 3)))
        if not gone and (heard is None or now - heard <= silent_after):
            return None
        if job.attempts >= self.max_attempts:
            then = f"fails (attempt {job.attempts} of {self.max_attempts} was its last)"
        else:
            then = f"is retried (attempt {job.attempts + 1} of {self.max_attempts})"
        when = f"{_iso(heard)} (no heartbeat since)" if heard is not None else "an unknown time"
        lost = f"worker {job.worker_id} lost at {when}" + ("; its process is gone" if gone else "")
        expires = job.lease_expires_at
        if gone or expires is None or expires <= now:
            retry = f"the job {then} when a worker next looks for work, within seconds while one runs"
        else:
            retry = f"the job {then} after {_iso(expires)}, when its lease ends"
        since = now - timedelta(seconds=WORKER_SEEN_WITHIN_S)
        with self.db.read() as session:
            others = session.scalar(select(func.count()).select_from(WorkerBeat).where(
                WorkerBeat.last_seen >= since, WorkerBeat.id != job.worker_id))
        if not others:
            retry += ("; no worker is running to do it: start one (`onnxforge worker`, or `onnxforge serve` without "
                      "--no-worker)")
        return f"{lost}; {retry}"

    # -- the worker's side --------------------------------------------------------------------------

    def beat(self, worker_id: str, running: int) -> None:
        """Record that `worker_id` is alive (running `running` jobs); forget workers long gone."""
        now = utcnow()
        with self.db.write() as session:
            row = session.get(WorkerBeat, worker_id)
            if row is None:
                session.add(WorkerBeat(id=worker_id, running=running, last_seen=now))
                session.execute(delete(WorkerBeat).where(WorkerBeat.last_seen < now - _FORGET_WORKERS_AFTER))
            else:
                row.running, row.last_seen = running, now

    def forget_worker(self, worker_id: str) -> None:
        """A worker that stops cleanly takes itself off the list at once."""
        with self.db.write() as session:
            session.execute(delete(WorkerBeat).where(WorkerBeat.id == worker_id))


    def claim(self, worker_id: str) -> ClaimedJob | None:
        """Take the oldest queued job, or None when the queue is empty or `max_running` jobs already run."""
        with self.db.write() as session:
            if self.max_running > 0:
                if not self.db.is_sqlite:
                    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CLAIM_LOCK_KEY})
                running = session.scalar(select(func.count()).select_from(Job).where(Job.status == "running"))
                if running >= self.max_running:
                    return None
            job = session.scalars(
                select(Job).where(Job.status == "queued").order_by(Job.created_at, Job.id).limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if job is None:
                return None
            # The clock is read once the lock is held (SQLite's write lock, PostgreSQL's claim lock or row
            # lock), not before waiting for it: a job that finished during the wait then never seems to
            # overlap the one claimed after it.
            now = utcnow()
            attempt = job.attempts + 1  # read before the UPDATE, which also refreshes `job`
            taken = session.execute(
                update(Job).where(Job.id == job.id, Job.status == "queued").values(
                    status="running", worker_id=worker_id, attempts=Job.attempts + 1, started_at=now,
                    lease_expires_at=now + self.lease, stage="validate", progress=0.0, runner_pid=None,
                    error=None,  # why it was queued again ("interrupted ...") is over: it runs now
                )
            ).rowcount
            if taken != 1:
                return None
            version = session.get(ModelVersion, job.version_id)
            assert version is not None
            return ClaimedJob(job.id, job.version_id, job.name, job.version, attempt,
                              dict(version.options or {}), version.has_calibration)

    def _owned(self, job_id: str, worker_id: str):  # noqa: ANN202 - an UPDATE statement
        return update(Job).where(Job.id == job_id, Job.worker_id == worker_id, Job.status == "running")

    def heartbeat(self, job_id: str, worker_id: str, *, stage: str | None = None, progress: float | None = None,
                  runner_pid: int | None = None) -> bool:
        """Renew the lease (and record progress). False: the job is no longer ours (deleted, recovered)."""
        values: dict[str, Any] = {"lease_expires_at": utcnow() + self.lease}
        if stage is not None:
            values["stage"] = stage
        if progress is not None:
            values["progress"] = progress
        if runner_pid is not None:
            values["runner_pid"] = runner_pid
        with self.db.write() as session:
            return session.execute(self._owned(job_id, worker_id).values(**values)).rowcount == 1

    def succeed(self, job: ClaimedJob, worker_id: str, *, report: dict[str, Any], selected: str,
                provider: str | None) -> bool:
        """Mark the job succeeded and its version ready to serve, in one transaction."""
        now = utcnow()
        with self.db.write() as session:
            if session.execute(self._owned(job.id, worker_id).values(
                status="succeeded", stage=None, progress=1.0, finished_at=now, lease_expires_at=None, error=None,
            )).rowcount != 1:
                return False
            session.execute(update(ModelVersion).where(
                ModelVersion.id == job.version_id, ModelVersion.status == "optimizing",
            ).values(status="ready", ready_at=now, report=report, selected=selected, provider=provider, error=None))
            return True

    def fail(self, job: ClaimedJob, worker_id: str, reason: str, *, unrunnable: bool = False) -> bool:
        """Mark the job and its version failed; `unrunnable`: the job proved the uploaded model cannot run at all,
        so the version must not serve its original either (Registry's pick_serving)."""
        with self.db.write() as session:
            if session.execute(self._owned(job.id, worker_id).values(
                status="failed", finished_at=utcnow(), lease_expires_at=None, error=reason,
            )).rowcount != 1:
                return False
            _fail_version(session, job.version_id, reason, unrunnable=unrunnable)
            return True

    def release(self, job: ClaimedJob, worker_id: str) -> bool:
        """Put a job back in the queue because its worker is shutting down (not the job's fault).

        The interrupted run does not count as an attempt.
        """
        with self.db.write() as session:
            return session.execute(self._owned(job.id, worker_id).values(
                status="queued", worker_id=None, runner_pid=None, stage=None, progress=0.0, started_at=None,
                lease_expires_at=None, attempts=Job.attempts - 1,
                error="interrupted by a worker shutdown; queued again",
            )).rowcount == 1

    def recover_lost(self, is_dead: Callable[[str | None], bool] = worker_is_dead) -> list[tuple[str, str]]:
        """Requeue (or fail, after max_attempts) running jobs whose worker is gone.

        A worker is gone when its lease expired, or at once when it ran on this host and its
        process no longer exists (a restart finds its own dead worker's job without waiting).
        Returns [(job id, "requeued" | "failed")].
        """
        now = utcnow()
        actions = []
        with self.db.write() as session:
            running = session.scalars(
                select(Job).where(Job.status == "running").with_for_update(skip_locked=True)
            ).all()
            for job in running:
                expired = job.lease_expires_at is None or job.lease_expires_at < now
                if not expired and not is_dead(job.worker_id):
                    continue
                why = "its lease expired" if expired else "its process is gone"
                if job.attempts < self.max_attempts:
                    job.status, job.stage, job.progress = "queued", None, 0.0
                    job.worker_id, job.runner_pid, job.started_at, job.lease_expires_at = None, None, None, None
                    job.error = (f"attempt {job.attempts} lost its worker ({why}: crashed, killed or the service "
                                 "stopped); queued again")
                    actions.append((job.id, "requeued"))
                else:
                    job.status, job.finished_at, job.lease_expires_at = "failed", now, None
                    job.error = (f"the worker running this job stopped {job.attempts} times (last time {why}: "
                                 f"crashed, killed or the service stopped) during stage {job.stage!r}; giving up. "
                                 "Upload the model again to retry")
                    _fail_version(session, job.version_id, job.error)
                    actions.append((job.id, "failed"))
        return actions


def _iso(moment: datetime) -> str:
    """A stored (naive UTC) time as the API writes times: ISO 8601, seconds, Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _fail_version(session, version_id: str, reason: str, *, unrunnable: bool = False) -> None:  # noqa: ANN001
    session.execute(update(ModelVersion).where(
        ModelVersion.id == version_id, ModelVersion.status == "optimizing",
    ).values(status="failed", error=reason, unrunnable=unrunnable or None))

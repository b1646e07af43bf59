"""A running job whose worker stopped beating says so in its view (worker_lost: when it was last heard, when the job
is retried or fails, whether any worker is left to do it); it read "running" with nothing else until its lease
ended, and for ever with no worker running."""

from __future__ import annotations

import subprocess
from datetime import timedelta

from sqlalchemy import update

from app.services.jobs import JobQueue, new_worker_id, worker_host
from app.store import Job, WorkerBeat, utcnow
from tests import models


def _dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_job_whose_worker_process_is_gone_says_so(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        job_id = api.upload(models.mlp(), "m.onnx").json()["job_id"]
        queue = JobQueue(api.services.db, lease_s=30, max_attempts=2)
        dead = f"{worker_host()}:{_dead_pid()}:deadbeef"
        queue.beat(dead, 1)
        assert queue.claim(dead).id == job_id
        view = api.job(job_id)
        assert view["status"] == "running", view
        lost = view["worker_lost"]
        assert lost.startswith(f"worker {dead} lost at "), lost
        assert "its process is gone; the job is retried (attempt 2 of 2) when a worker next looks for work" in lost
        assert "no worker is running to do it" in lost, lost
        version = api.client.get("/v1/models/m/versions/1").json()  # the version view's job says the same
        assert version["job"]["worker_lost"] == lost, version["job"]
        listed = api.client.get("/v1/models/m").json()["versions"][0]["job"]
        assert listed["worker_lost"] == lost, listed

        assert queue.recover_lost() == [(job_id, "requeued")]  # what the next worker does
        view = api.job(job_id)
        assert view["status"] == "queued" and view["worker_lost"] is None, view


def test_a_job_whose_worker_on_another_host_went_silent_says_when_its_lease_ends(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, job_lease_s=30, job_max_attempts=1) as api:
        job_id = api.upload(models.mlp(), "m.onnx").json()["job_id"]
        queue = JobQueue(api.services.db, lease_s=30, max_attempts=1)
        elsewhere = "another-host:4242:cafebabe"  # judged by its heartbeats alone
        queue.beat(elsewhere, 1)
        assert queue.claim(elsewhere).id == job_id
        assert api.job(job_id)["worker_lost"] is None  # just claimed: heard from now

        # 25 s later with no heartbeat: the lease (renewed every 10 s) was last renewed 25 s ago, 5 s are left
        heard = utcnow() - timedelta(seconds=25)
        with api.services.db.write() as session:
            session.execute(update(WorkerBeat).where(WorkerBeat.id == elsewhere).values(last_seen=heard))
            session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=heard + timedelta(seconds=30)))
        lost = api.job(job_id)["worker_lost"]
        assert lost.startswith(f"worker {elsewhere} lost at {heard:%Y-%m-%dT%H:%M:%S}Z (no heartbeat since); "), lost
        expires = heard + timedelta(seconds=30)
        assert f"the job fails (attempt 1 of 1 was its last) after {expires:%Y-%m-%dT%H:%M:%S}Z, when its lease " \
               "ends" in lost, lost

        alive = new_worker_id()  # a worker running now: no longer "no worker is running to do it"
        assert "no worker is running" in lost
        queue.beat(alive, 0)
        assert "no worker is running" not in api.job(job_id)["worker_lost"]


def test_a_job_whose_worker_beats_is_not_lost(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, job_lease_s=30) as api:
        job_id = api.upload(models.mlp(), "m.onnx").json()["job_id"]
        queue = JobQueue(api.services.db, lease_s=30, max_attempts=2)
        me = new_worker_id()  # this very process: alive
        queue.beat(me, 1)
        assert queue.claim(me).id == job_id
        # silent for 15 s: within two lease renewals (every 10 s), not lost
        with api.services.db.write() as session:
            session.execute(update(WorkerBeat).where(WorkerBeat.id == me).values(
                last_seen=utcnow() - timedelta(seconds=15)))
            session.execute(update(Job).where(Job.id == job_id).values(
                lease_expires_at=utcnow() + timedelta(seconds=15)))
        view = api.job(job_id)
        assert view["status"] == "running" and view["worker_lost"] is None, view

"""The worker's loop: recover lost jobs, claim one, run it in a child process under a time limit, publish.

A worker runs up to `worker_concurrency` jobs at once, each watched by its own thread (claims and
recovery stay on the main thread); `max_concurrent_jobs` caps running jobs across all workers, in
the claim itself (JobQueue). Children are started without a preexec_fn (unsafe once there are
threads): the runner makes itself die with the worker as its first step instead.

While the child runs, the worker renews the job's lease with each heartbeat (and records the
stage and progress the child reports). It stops the child when the job's time limit passes, when
the job is no longer its own (deleted, or recovered by another worker after a lost lease), or when
the worker is asked to stop (SIGTERM, SIGINT): the job is then put back in the queue, not failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from app.services.jobs import ClaimedJob, JobQueue, new_worker_id
from app.settings import Settings
from app.storage import ArtifactStore, open_store
from app.storage.base import CALIBRATION, OPTIMIZED, ORIGINAL, REPORT, artifact_key, version_prefix
from app.store import Database, Job, ModelVersion
from app.worker.lifeline import die_with_parent
from app.worker.runner import RunSpec

log = logging.getLogger("onnxforge.worker")

_RECOVER_EVERY_S = 2.0
_PROGRESS_WRITE_EVERY_S = 0.5
_ORPHAN_AGE_S = 3600.0  # an upload's files wait for its commit far less than this


class _Messages:
    """JSON lines from the child's pipe, read without blocking longer than a timeout."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False
        self._buffer = b""

    def read(self, timeout: float) -> list[list]:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.closed = True
            return []
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


@dataclass
class _Outcome:
    kind: str  # done | error | crashed | timeout | lost | stopped
    detail: str = ""
    selected: str = ""
    unrunnable: bool = False  # an error proving the uploaded model cannot run (runner.cannot_run): not to be served


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class Worker:
    def __init__(self, settings: Settings, *, db: Database | None = None, store: ArtifactStore | None = None) -> None:
        self.settings = settings
        self.db = db or Database(settings.resolved_database_url)
        self.db.create_schema()
        self.store = store or open_store(settings)
        self.queue = JobQueue(self.db, settings.job_lease_s, settings.job_max_attempts,
                              max_running=settings.max_concurrent_jobs)
        self.worker_id = new_worker_id()
        self._stop = threading.Event()
        self._last_recovery = 0.0
        self._swept = False  # stale work folders removed (once, after the first recovery)
        self._running: list[threading.Thread] = []  # one per job being run

    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    # -- the loop ------------------------------------------------------------------------------------

    def run_forever(self) -> None:
        log.info("worker %s started (database %s)", self.worker_id, self.db.engine.url.render_as_string())
        try:
            while not self._stop.is_set():
                if not self.run_once():
                    self._stop.wait(self.settings.worker_poll_s)
        finally:
            self._stop.set()  # running jobs are put back in the queue
            for thread in self._running:
                thread.join()
            with contextlib.suppress(SQLAlchemyError):  # if not, the row ages out of /readyz's count
                self.queue.forget_worker(self.worker_id)
        log.info("worker %s stopped", self.worker_id)

    def run_once(self) -> bool:
        """Recover lost jobs (now and then), claim a job if a slot is free and start it.

        False when there was nothing to do (no free slot, nothing queued, or the global cap reached).
        """
        self._running = [thread for thread in self._running if thread.is_alive()]
        try:
            if time.monotonic() - self._last_recovery >= _RECOVER_EVERY_S:
                self._last_recovery = time.monotonic()
                self.queue.beat(self.worker_id, len(self._running))  # busy or idle: /readyz counts it
                for job_id, action in self.queue.recover_lost():
                    log.warning("job %s lost its worker: %s", job_id, action)
                if not self._swept:
                    self.sweep_stale_work()
                    self.sweep_orphaned_artifacts()
                    self.retire_old_versions()
                    self._swept = True
            if len(self._running) >= self.settings.worker_concurrency:
                return False
            job = self.queue.claim(self.worker_id)
        except SQLAlchemyError as exc:  # the database is down: keep trying, it may come back
            log.error("cannot reach the database: %s", str(exc).splitlines()[0])
            return False
        if job is None:
            return False
        thread = threading.Thread(target=self._execute, args=(job,), name=f"job-{job.id}", daemon=True)
        self._running.append(thread)
        thread.start()
        return True

    def sweep_stale_work(self) -> list[str]:
        """Remove the work folders (tmp/work/<job id>) of jobs that are over: a worker killed mid-job leaves its
        folder, and nothing else would ever remove it. Returns the job ids whose folders were removed.

        Only jobs that succeeded or failed, or no longer exist: those are never claimed again, so no other worker
        sharing this data folder can be writing there. A queued job's old folder is left to whoever claims it
        (each claim starts from an empty folder), a running one's to its worker. Run after the first recovery,
        which settles a dead worker's jobs. Raises SQLAlchemyError when the database does not answer (retried).
        """
        try:
            folders = {path.name: path for path in self.settings.work_dir.iterdir() if path.is_dir()}
        except OSError:  # no work folder yet
            return []
        if not folders:
            return []
        with self.db.read() as session:
            live = set(session.scalars(
                sa.select(Job.id).where(Job.id.in_(folders), Job.status.in_(("queued", "running")))))
        stale = sorted(set(folders) - live)
        for job_id in stale:
            shutil.rmtree(folders[job_id], ignore_errors=True)
        if stale:
            log.info("removed the work folders of %d jobs that are over (left by a stopped worker): %s", len(stale),
                     ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else ""))
        return stale

    def sweep_orphaned_artifacts(self, min_age_s: float = _ORPHAN_AGE_S) -> list[tuple[str, int]]:
        """Remove the artifact folders no live version owns; returns their (name, version).

        A deleted version's files are removed after its delete commits, so a crash (or a read-only disk) in between
        leaves them, and an upload cut off between storing its files and committing its version leaves files with
        no version at all: nothing else would ever remove either. A deleted version's folder goes at once (version
        numbers are never reused); one with no version row only once older than `min_age_s`, since an upload
        stores its files just before it commits, and only if the database knows its model: a worker pointed at
        another (or a new, empty) database than the one these files belong to must not take them for orphans.
        Raises SQLAlchemyError when the database does not answer.
        """
        try:
            stored = self.store.stored_versions()
        except Exception as exc:  # noqa: BLE001 - a bucket's errors are not OSErrors; the next start tries again
            log.warning("could not list the artifact store to remove orphaned files: %s", exc)
            return []
        if not stored:
            return []
        with self.db.read() as session:
            rows = {(name, number): status for name, number, status in session.execute(
                sa.select(ModelVersion.name, ModelVersion.version, ModelVersion.status))}
        known = {name for name, _ in rows}
        now = time.time()
        orphans = sorted(version for version, written in stored.items() if rows.get(version) == "deleted"
                         or (version not in rows and version[0] in known and now - written > min_age_s))
        removed = []
        for name, number in orphans:
            try:
                self.store.delete_prefix(version_prefix(name, number))
                removed.append((name, number))
            except Exception as exc:  # noqa: BLE001 - as above; the others are still removed
                log.warning("could not remove the orphaned files of model %r version %d: %s", name, number, exc)
        if removed:
            log.info("removed the artifact folders of %d versions no live version owns (deleted, or an upload cut "
                     "off): %s", len(removed), ", ".join(f"{n} v{v}" for n, v in removed[:5])
                     + (", ..." if len(removed) > 5 else ""))
        return removed

    def retire_old_versions(self) -> dict[str, list[tuple[str, int]]]:
        """Apply ONNXFORGE_KEEP_VERSIONS to every model once, at start: uploads apply it to their own model, so
        without this a model nobody uploads to any more would keep its versions under a newly set limit.

        WHY here and not in the API: the worker starts once for all API replicas. The registry is imported only
        when the setting is on: it brings ONNX Runtime (~57 MiB) into this process, which otherwise never loads it.
        """
        if self.settings.keep_versions <= 0:
            return {}
        from app.services.registry import Registry  # noqa: PLC0415 - see the docstring

        retired = Registry(self.db, self.store).retire_all(self.settings.keep_versions)
        for name, gone in retired.items():
            log.info("model %r: deleted versions %s (ONNXFORGE_KEEP_VERSIONS=%d)", name,
                     ", ".join(str(number) for _, number in gone), self.settings.keep_versions)
        return retired

    # -- one job -------------------------------------------------------------------------------------

    def _execute(self, job: ClaimedJob) -> None:
        log.info("job %s: optimizing %s version %s (attempt %d)", job.id, job.name, job.version, job.attempt)
        started = time.monotonic()
        work = self.settings.work_dir / job.id
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        outcome = _Outcome("lost")
        status = "left to its lease (its outcome was not recorded)"
        try:
            outcome = self._run_child(job, work)
            status = self._finish(job, work, outcome)
        except SQLAlchemyError as exc:
            # Cannot record the outcome: the lease will expire and the job will be recovered.
            log.error("job %s: cannot record its outcome, the database failed: %s", job.id, str(exc).splitlines()[0])
        except Exception:  # noqa: BLE001 - this thread must not die silently; the lease recovers the job
            log.exception("job %s: the worker failed running it; its lease will expire and it is recovered", job.id)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # The job's last line names all an operator asks about, without looking up the job id's earlier lines.
        what = (f", variant {outcome.selected!r} selected" if status == "succeeded"
                else f": {outcome.detail}" if outcome.detail else "")
        log.info("job %s: model %r version %s %s after %.1f s%s", job.id, job.name, job.version, status,
                 time.monotonic() - started, what)

    def _run_child(self, job: ClaimedJob, work: Path) -> _Outcome:
        try:
            model = self.store.fetch(artifact_key(job.name, job.version, ORIGINAL))
            calibration = (self.store.fetch(artifact_key(job.name, job.version, CALIBRATION))
                           if job.has_calibration else None)
        except FileNotFoundError as exc:
            return _Outcome("error", f"the uploaded files of this version are missing from the store ({exc}): "
                                     f"{self._store_hint()}")
        config = {
            "precision": job.options.get("precision", "auto"),
            "int8_mode": job.options.get("int8_mode"),
            "calibration_method": job.options.get("calibration_method", "minmax"),
            "provider": self.settings.providers,
            "threads": self.settings.intra_op_threads,
            "time_budget_s": self.settings.optimize_time_budget_s,
        }
        # The user's accuracy tolerance, when the upload gave one (else the optimizer's defaults).
        config.update({key: job.options[key] for key in ("min_cosine", "min_top1", "metrics")
                       if job.options.get(key) is not None})
        spec = RunSpec(str(model), str(work / "out"), str(calibration) if calibration else None, config,
                       memory_limit_mb=self.settings.job_memory_limit_mb)
        read_fd, write_fd = os.pipe()
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "app.worker.runner", str(write_fd), str(os.getpid())], stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
            )
        finally:
            os.close(write_fd)  # the child holds the only writing end: EOF on ours means it is gone
        try:
            assert child.stdin is not None
            child.stdin.write(spec.to_json().encode())
            child.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; _watch explains from the exit code
        try:
            return self._watch(job, child, _Messages(read_fd))
        finally:
            os.close(read_fd)
            if child.poll() is None:
                child.kill()
            child.wait(5)

    def _store_hint(self) -> str:
        """Where this worker looked, and why it may differ from where the API stored the upload (a worker on
        another machine or container without the shared folder finds the database's job but not its files)."""
        where = (f"ONNXFORGE_STORAGE_URL={self.settings.storage_url}" if self.settings.storage_url
                 else f"the folder {self.settings.artifacts_dir.resolve()} (ONNXFORGE_DATA_DIR/artifacts)")
        return (f"this worker looked in {where}; the worker and the API must share the artifact store: the same "
                "ONNXFORGE_DATA_DIR on a shared volume, or the same ONNXFORGE_STORAGE_URL")

    def _watch(self, job: ClaimedJob, child: subprocess.Popen, messages: _Messages) -> _Outcome:
        limit = self.settings.job_time_limit_s
        deadline = time.monotonic() + limit
        heartbeat_every = self.settings.job_lease_s / 3
        stage, progress = "validate", 0.0
        if not self.queue.heartbeat(job.id, self.worker_id):
            return _Outcome("lost")
        last_beat = last_write = time.monotonic()
        dirty = False
        result: _Outcome | None = None
        while not messages.closed:
            for message in messages.read(timeout=0.1):
                if message[0] == "started":  # it dies with this worker from now on: publish its pid
                    if not self.queue.heartbeat(job.id, self.worker_id, runner_pid=child.pid):
                        return _Outcome("lost")
                elif message[0] == "progress":
                    stage, progress, dirty = message[1], max(progress, min(1.0, message[2])), True
                elif message[0] == "done":
                    result = _Outcome("done", selected=message[1])
                elif message[0] == "error":
                    result = _Outcome("error", message[1], unrunnable="unrunnable" in message[2:])
            now = time.monotonic()
            if self._stop.is_set():
                return _Outcome("stopped")
            if now > deadline:
                return _Outcome("timeout", f"the optimization exceeded the job time limit of {limit:g} s "
                                           f"(ONNXFORGE_JOB_TIME_LIMIT_S) during stage {stage!r} and was stopped")
            if now - last_beat >= heartbeat_every or (dirty and now - last_write >= _PROGRESS_WRITE_EVERY_S):
                if not self.queue.heartbeat(job.id, self.worker_id, stage=stage, progress=progress):
                    return _Outcome("lost")
                last_beat = last_write = now
                dirty = False
        try:
            code = child.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        if result is not None:
            return result
        how = f"was killed by {_signal_name(code)}" if code is not None and code < 0 else f"exited with code {code}"
        return _Outcome("crashed", f"the optimizer process {how} during stage {stage!r} (a crash in ONNX Runtime or "
                                   "its tools, or out of memory); the service kept running")

    # -- recording the outcome -----------------------------------------------------------------------

    def _finish(self, job: ClaimedJob, work: Path, outcome: _Outcome) -> str:
        """Record the outcome; returns what became of the job (for its last log line)."""
        dropped = "dropped (deleted, or recovered by another worker)"
        if outcome.kind == "stopped":
            self.queue.release(job, self.worker_id)
            return "put back in the queue"
        if outcome.kind == "lost":
            log.warning("job %s is no longer ours (deleted or recovered elsewhere); dropping its work", job.id)
            self._drop_if_deleted(job)
            return dropped
        if outcome.kind != "done":
            if not self.queue.fail(job, self.worker_id, outcome.detail, unrunnable=outcome.unrunnable):
                self._drop_if_deleted(job)
                return dropped
            return "failed" if outcome.kind == "error" else f"failed ({outcome.kind})"
        out = work / "out"
        try:
            report = json.loads((out / "report.json").read_text())
            # Where the optimizer kept the original, its model.onnx is the original with inferred shapes added: the
            # "optimized" download is then the stored original itself (Registry.artifact), so this copy is not kept.
            if outcome.selected != report.get("baseline"):  # (the report names it: no optimizer import here)
                self.store.put_file(artifact_key(job.name, job.version, OPTIMIZED), out / "model.onnx", move=True)
            self.store.put_file(artifact_key(job.name, job.version, REPORT), out / "report.json", move=True)
        except (OSError, ValueError) as exc:
            outcome.detail = f"could not store the optimized model: {exc}"
            self.queue.fail(job, self.worker_id, outcome.detail)
            return "failed"
        if not self.queue.succeed(job, self.worker_id, report=report, selected=outcome.selected,
                                  provider=report.get("provider")):
            self._drop_if_deleted(job)
            return dropped
        return "succeeded"

    def _drop_if_deleted(self, job: ClaimedJob) -> None:
        """A version deleted while its job ran: remove what this worker may have stored for it."""
        with self.db.read() as session:
            version = session.get(ModelVersion, job.version_id)
        if version is None or version.status == "deleted":
            self.store.delete_prefix(version_prefix(job.name, job.version))


def run_worker(settings: Settings, parent_pid: int | None = None) -> None:
    """Entry point of a worker process (embedded by the API, or `onnxforge worker`)."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = Worker(settings)
    worker.install_signal_handlers()
    try:
        worker.run_forever()
    finally:
        worker.db.dispose()

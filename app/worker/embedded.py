"""The worker process the API starts by default (settings.run_worker), and keeps alive.

It is a separate process, never a thread of the API: an optimization that calibrates for minutes
or crashes ONNX Runtime must not touch the process that answers predict. If the worker dies (an
out-of-memory kill, a SIGKILL), it is started again; the new worker finds the dead one's job and
requeues or fails it (JobQueue.recover_lost).

It is started as `python -m app.worker` rather than with multiprocessing: a spawned
multiprocessing child re-imports the parent's main script, which breaks any script that builds the
app without an `if __name__ == "__main__"` guard.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time

from app.settings import Settings

log = logging.getLogger("onnxforge.worker")

SETTINGS_ENV = "ONNXFORGE_WORKER_SETTINGS"  # the API's settings as JSON, so the worker sees exactly the same
_CHECK_EVERY_S = 0.5
_MAX_BACKOFF_S = 30.0


class EmbeddedWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._backoff = 0.0
        self._started_at = 0.0
        self._restart_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        env = {**os.environ, SETTINGS_ENV: self.settings.model_dump_json()}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.worker", "--parent-pid", str(os.getpid())], env=env,
        )
        self._started_at = time.monotonic()
        log.info("worker process started (pid %s)", self.process.pid)

    def poll(self) -> None:
        """One supervision step, never blocking: start the worker again if it died and its back-off is over.

        Called from the API's event loop (`supervise`) or from `serve --workers N`'s parent (app/prefork.py).
        """
        if self.process is None or self.process.poll() is None:
            return
        now = time.monotonic()
        if self._restart_at is None:
            log.warning("worker process %s died (exit code %s); starting a new one",
                        self.process.pid, self.process.returncode)
            # A worker that keeps dying soon after its start gets restarted ever more slowly.
            if now - self._started_at > 60:
                self._backoff = 0.0
            self._restart_at = now + self._backoff
            self._backoff = min(_MAX_BACKOFF_S, max(1.0, self._backoff * 2))
        if now >= self._restart_at:
            self._restart_at = None
            self.start()
            self.restarts += 1

    async def supervise(self) -> None:
        """Restart the worker whenever it dies, backing off if it keeps dying at once."""
        while True:
            await asyncio.sleep(_CHECK_EVERY_S)
            self.poll()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to stop (it puts a running job back in the queue), kill it if it does not."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

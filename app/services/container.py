"""Build every long-lived object of the API process from the settings, and close them again.

The lifespan calls `open_services` at start and `Services.close` at shutdown; routes get the
`Services` through a dependency (app/api/deps.py), never from a module global.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from app.metrics import Metrics
from app.runtime.batching import Batcher
from app.runtime.sessions import SessionCache
from app.services.jobs import JobQueue
from app.services.predict import PredictService
from app.services.registry import Registry
from app.services.uploads import ValidationLimiter
from app.settings import MiB, Settings
from app.storage import ArtifactStore, open_store
from app.store import Database
from app.worker.embedded import EmbeddedWorker
from optimizer.runtime import SessionSettings, resolve_provider

log = logging.getLogger("onnxforge")

_STALE_UPLOAD_S = 24 * 3600


@dataclass
class Services:
    settings: Settings
    db: Database
    store: ArtifactStore
    registry: Registry
    jobs: JobQueue
    sessions: SessionCache
    predict: PredictService
    metrics: Metrics
    executor: ThreadPoolExecutor
    provider: str  # what sessions are created on here ("cpu" | "cuda"), after probing CUDA
    worker: EmbeddedWorker | None
    validations: ValidationLimiter  # bounds the uploads validated at once in this process

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.db.dispose()


def _remove_stale_uploads(folder: Path) -> None:
    """Uploads cut off by a crash leave their folders; remove old ones (not recent: another replica's)."""
    if not folder.is_dir():
        return
    cutoff = time.time() - _STALE_UPLOAD_S
    for path in folder.iterdir():
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def open_services(settings: Settings) -> Services:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    db.create_schema()
    store = open_store(settings)
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_uploads(settings.uploads_dir)
    provider = resolve_provider(settings.providers)
    sessions = SessionCache(settings.session_cache_size, SessionSettings(
        provider=provider, intra_op_threads=settings.intra_op_threads, inter_op_threads=settings.inter_op_threads,
        # Idle intra-op threads that spin take the core the event loop needs to parse the next requests:
        # with spinning, batching measured slower than no batching at 32 concurrent clients.
        allow_spinning=settings.intra_op_spinning,
    ), max_bytes=settings.session_cache_max_mb * MiB)
    jobs = JobQueue(db, settings.job_lease_s, settings.job_max_attempts)
    validations = ValidationLimiter(settings.max_concurrent_validations, settings.validation_wait_s)
    metrics = Metrics(jobs.counts, lambda: len(sessions), lambda: sessions.bytes,
                      lambda: (validations.running, validations.refused), provider=provider)
    registry = Registry(db, store)
    # One thread more than one model may hold (max_running_per_model): a slow model leaves one to the others.
    executor = ThreadPoolExecutor(settings.predict_threads + 1, thread_name_prefix="predict")
    batcher = None
    if settings.batch_max_size > 1:
        batcher = Batcher(executor, max_batch_size=settings.batch_max_size,
                          max_delay_s=settings.batch_max_delay_ms / 1000,
                          max_running=settings.batch_max_running,
                          observe=lambda key, *rest: metrics.observe_batch(key[:3], *rest))
    predict = PredictService(registry, sessions, metrics, executor, cache_ttl_s=settings.registry_cache_ttl_s,
                             max_input_elements=settings.max_input_elements, batcher=batcher,
                             run_time_limit_s=settings.predict_time_limit_s,
                             max_running_per_model=settings.predict_threads)
    worker = EmbeddedWorker(settings) if settings.run_worker else None
    log.info("onnxforge: data in %s, database %s, sessions on %s, worker %s", settings.data_dir.resolve(),
             db.engine.url.render_as_string(hide_password=True), provider, "embedded" if worker else "external")
    return Services(settings, db, store, registry, jobs, sessions, predict, metrics, executor, provider, worker,
                    validations)

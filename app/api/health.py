"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import shutil
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from app.api.deps import services_of
from app.api.schemas import ErrorOut
from app.errors import NotReadyError
from app.metrics import QueueState
from app.services.container import Services
from app.services.jobs import WORKER_SEEN_WITHIN_S
from optimizer.errors import first_line

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (answers even while the database is down). Async: a load balancer's probe
    needs no trip through the thread pool."""
    return {"status": "alive"}


def _check(services: Services) -> dict[str, str]:
    problems = {}
    try:
        services.db.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        problems["database"] = first_line(exc)
    try:
        services.store.check()
    except Exception as exc:  # noqa: BLE001
        problems["storage"] = str(exc)
    return problems


def _storage_space(services: Services) -> dict[str, Any]:
    """Free space where uploads and artifacts are written (the least of the two, when they are not one disk), and a
    warning when it is below the largest model the service accepts (ONNXFORGE_MAX_MODEL_BYTES).

    WHY that threshold: below it, an upload the service's own limits allow can be refused with 507, and a job cannot
    store a variant of such a model: the operator must act, whatever the typical model is. A small fixed floor
    would stay quiet until a 2 GB model fails. WHY a warning, not a 503: readiness takes a replica out of the load
    balancer, and predict only reads stored models: a full disk (shared by every replica, often) would stop serving
    everywhere for what only uploads and jobs need. Uploads meanwhile get 507 saying the disk is full.
    """
    sizes = [shutil.disk_usage(services.settings.uploads_dir).free]
    store_free = services.store.free_bytes()
    if store_free is not None:
        sizes.append(store_free)
    free, floor = min(sizes), services.settings.max_model_bytes
    if free >= floor:
        return {"storage": "ok", "storage_free_bytes": free}
    return {"storage": "low", "storage_free_bytes": free,
            "storage_warning": f"{free / 2**20:.1f} MiB free on the server's disk, less than the largest model "
                               f"accepted ({floor / 2**20:.1f} MiB, ONNXFORGE_MAX_MODEL_BYTES): uploads and jobs may "
                               "fail with 507 until space is freed in ONNXFORGE_DATA_DIR (predict is unaffected)"}


def _seen_within(services: Services) -> float:
    """How recent a worker's beat must be to count: /readyz and /metrics alike. An idle worker beats once per
    poll: a slow poll setting must not make it look gone between two beats."""
    return max(WORKER_SEEN_WITHIN_S, 3 * services.settings.worker_poll_s)


def _workers(services: Services) -> dict[str, Any]:
    """This process's own worker, how many workers beat lately (any host), and a warning when queued jobs
    have nobody to run them (an API started with --no-worker and no `onnxforge worker` anywhere)."""
    own = "external" if services.worker is None else ("running" if services.worker.alive() else "restarting")
    within = _seen_within(services)
    seen, queued = services.jobs.workers_seen(within), services.jobs.counts()["queued"]
    answer: dict[str, Any] = {"worker": own, "workers_seen": seen}
    if seen == 0 and queued:
        answer["warning"] = (f"{queued} job(s) queued and no optimizer worker seen in the last "
                             f"{within:g} s: start `onnxforge worker` on this database "
                             "(or `onnxforge serve` without --no-worker)")
    return answer


@router.get("/readyz", responses={503: {"model": ErrorOut}})
async def readyz(services: Services = Depends(services_of)) -> dict[str, Any]:
    """Ready when the artifact store answers (503 otherwise); a database that does not answer is reported, not a 503.

    WHY the database is not a reason for 503: every replica shares it, so its outage fails every replica's readiness
    at once and a load balancer (Kubernetes) pulls them all, including the models they can still serve: predict
    keeps answering from cached resolutions through an outage (app/services/predict.py) and answers the rest 503 with
    Retry-After itself. Taking a replica out helps only when another replica is better off, which a shared database
    never makes so. The artifact store may be per replica (a volume), so it stays a reason. Predict does not need a
    worker either: a missing one is reported (`workers_seen`, `warning`).
    """
    problems = await run_in_threadpool(_check, services)
    if "storage" in problems:
        raise NotReadyError("not ready: " + "; ".join(f"{part}: {why}" for part, why in problems.items()))
    storage = await run_in_threadpool(_storage_space, services)
    workers: dict[str, Any] = {}
    if "database" not in problems:
        try:
            workers = await run_in_threadpool(_workers, services)
        except SQLAlchemyError as exc:  # the database went away since the check above
            problems["database"] = first_line(exc)
    if "database" in problems:
        return {"status": "degraded", "database": f"unreachable: {problems['database']}", **storage,
                "provider": services.provider,
                "note": "models already served by this process keep serving; others get 503 until the database "
                        "answers; uploads, deletes and jobs wait for it"}
    return {"status": "ready", "database": "ok", **storage, "provider": services.provider, **workers}


def _queue_state(services: Services) -> QueueState:
    """The scrape's reads from the database: workers seen, the oldest queued job, which versions with series here
    are still live. Raises SQLAlchemyError when the database is down."""
    with_series = services.metrics.versions_with_series()  # label values: the version as text
    live = services.registry.live({(name, int(version)) for name, version in with_series})
    return QueueState(services.jobs.workers_seen(_seen_within(services)), services.jobs.oldest_queued_s(),
                      frozenset((name, str(version)) for name, version in live))


@router.get("/metrics", response_class=Response)
def metrics(services: Services = Depends(services_of)) -> Response:
    """Prometheus: HTTP requests, predict counts and latency per model/version/variant, jobs by status, workers
    seen and the oldest queued job's age; a deleted version's series are dropped here."""
    try:
        queue = _queue_state(services)
    except SQLAlchemyError:  # a scrape must not fail because the database is down: the rest still answers
        queue = None
    body, content_type = services.metrics.render(queue)
    return Response(body, media_type=content_type)

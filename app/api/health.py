"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

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
    """Ready when the database and the artifact store answer; 503 otherwise.

    Predict does not need a worker, so a missing worker is reported (`workers_seen`, `warning`), not a 503.
    """
    problems = await run_in_threadpool(_check, services)
    if problems:
        raise NotReadyError("not ready: " + "; ".join(f"{part}: {why}" for part, why in problems.items()))
    try:
        workers = await run_in_threadpool(_workers, services)
    except SQLAlchemyError as exc:  # the database went away since the check above
        raise NotReadyError(f"not ready: database: {first_line(exc)}") from None
    return {"status": "ready", "database": "ok", "storage": "ok", "provider": services.provider, **workers}


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

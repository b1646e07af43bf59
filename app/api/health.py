"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import services_of
from app.api.schemas import ErrorOut
from app.errors import NotReadyError
from app.services.container import Services
from optimizer.errors import first_line

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (answers even while the database is down)."""
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


@router.get("/readyz", responses={503: {"model": ErrorOut}})
async def readyz(services: Services = Depends(services_of)) -> dict[str, Any]:
    """Ready when the database and the artifact store answer; 503 otherwise."""
    problems = await run_in_threadpool(_check, services)
    if problems:
        raise NotReadyError("not ready: " + "; ".join(f"{part}: {why}" for part, why in problems.items()))
    worker = "external" if services.worker is None else ("running" if services.worker.alive() else "restarting")
    return {"status": "ready", "database": "ok", "storage": "ok", "provider": services.provider, "worker": worker}


@router.get("/metrics", response_class=Response)
def metrics(services: Services = Depends(services_of)) -> Response:
    """Prometheus: HTTP requests, predict counts and latency per model/version/variant, jobs by status."""
    body, content_type = services.metrics.render()
    return Response(body, media_type=content_type)

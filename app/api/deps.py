"""FastAPI dependencies: hand the lifespan's Services to routes (no module globals)."""

from __future__ import annotations

from fastapi import Request

from app.errors import NotReadyError
from app.services.container import Services


def get_services(request: Request) -> Services:
    services = getattr(request.app.state, "services", None)
    if services is None:
        raise NotReadyError("the service is starting or stopping")
    return services


async def services_of(request: Request) -> Services:
    """`get_services` as an async dependency: FastAPI runs a sync one in a worker thread, a hop per request."""
    return get_services(request)

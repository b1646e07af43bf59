"""FastAPI dependencies: hand the lifespan's Services to routes (no module globals)."""

from __future__ import annotations

from fastapi import Request

from app.errors import NotReadyError
from app.services.container import Services


def get_services(request: Request) -> Services:
    """The app's Services, or 503 while it starts or stops. Routes take `Depends(services_of)`; this plain
    function is for code that is not a FastAPI route (raw ASGI routes)."""
    services = getattr(request.app.state, "services", None)
    if services is None:
        raise NotReadyError("the service is starting or stopping")
    return services


async def services_of(request: Request) -> Services:
    """The one dependency routes reach the services by. Async: FastAPI runs a sync dependency in a worker
    thread, a hop per request."""
    return get_services(request)

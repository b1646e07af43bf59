"""The FastAPI application: `create_app(settings)` for tests and embedding, `app` for `uvicorn app.main:app`.

Everything long-lived (database, artifact store, session cache, the worker process) is created in
the lifespan from the settings and reaches routes through `app.api.deps.services_of`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.api import health, jobs, models, v2
from app.api.errors import install_error_handlers
from app.api.web import install_dashboard
from app.metrics import HttpMetricsMiddleware
from app.security import install_security
from app.services.container import open_services
from app.settings import Settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    services = await run_in_threadpool(open_services, app.state.settings)
    supervisor = None
    if services.worker is not None:
        services.worker.start()
        supervisor = asyncio.create_task(services.worker.supervise())
    app.state.services = services
    try:
        yield
    finally:
        app.state.services = None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        await run_in_threadpool(services.close)


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="onnxforge",
        version="0.1.0",
        summary="Upload an ONNX model, get it optimized (fusion, FP16, INT8) with proof, and served on ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings()
    app.state.services = None
    install_error_handlers(app)
    app.include_router(v2.router)
    app.include_router(models.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    install_dashboard(app)
    app.add_middleware(HttpMetricsMiddleware,
                       metrics=lambda: app.state.services.metrics if app.state.services else None)
    install_security(app, app.state.settings)
    return app


app = create_app()

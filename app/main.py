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
from app.api.errors import error_response, install_error_handlers
from app.api.web import install_dashboard
from app.fastpath import FastInfer, fast_target, headers_of
from app.metrics import HttpMetricsMiddleware
from app.origin_guard import SECURITY_HEADERS, OriginGuard, guard_of
from app.security import Receive, Scope, Send, cors_origins, install_security, load_api_keys
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


class Onnxforge(FastAPI):
    """FastAPI with the fast path (app/fastpath.py) in front of its whole stack: a /v2 infer or /v1 predict
    request is recognized by a string test and answered there; every other request goes through FastAPI.

    In front of both: the browser guard (app/origin_guard.py; here rather than as a middleware, which the fast path
    would bypass) and the security headers on every answer."""

    fast_infer: FastInfer | None = None  # None: every request takes the normal stack (CORS is configured)
    guard: OriginGuard = OriginGuard(open=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        send = with_security_headers(send)
        if self.guard.open:
            headers = headers_of(scope["headers"])  # the short HTTP path's one pass, for the same three headers
            refused = self.guard.refusal(scope["method"], headers.host, headers.origin, headers.fetch_site,
                                         scope.get("server"))
            if refused is not None:
                await error_response(403, refused)(scope, receive, send)
                return
        if scope["path"].endswith("/"):
            scope = without_trailing_slash(scope)
        if self.fast_infer is not None and scope["method"] == "POST" \
                and not scope.get("root_path"):
            target = fast_target(scope["path"])
            if target is not None:
                await self.fast_infer(scope, receive, send, target)
                return
        await super().__call__(scope, receive, send)


def with_security_headers(send: Send) -> Send:
    """`send` adding SECURITY_HEADERS to the answer's head."""

    async def secured(message: dict) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
        await send(message)

    return secured


def without_trailing_slash(scope: Scope) -> Scope:
    """The request for `/v1/models/` as the one for `/v1/models`: every route answers with or without a trailing
    slash, in place. Starlette's alternative, a redirect, builds an absolute URL from the scheme it sees, which
    behind a TLS proxy (uvicorn's proxy headers are off) is http://; and a redirected POST sends its body twice.
    Only `/` itself (the dashboard, also under a root_path) keeps its slash."""
    path, root = scope["path"], scope.get("root_path", "")
    route = path[len(root):] if root and path.startswith(root) else path
    if len(route) <= 1:
        return scope
    stripped = route.rstrip("/") or "/"
    raw = scope.get("raw_path")
    return {**scope, "path": path[: len(path) - len(route)] + stripped,
            "raw_path": (raw.rstrip(b"/") or b"/") if raw else raw}


def create_app(settings: Settings | None = None) -> FastAPI:
    app = Onnxforge(
        title="onnxforge",
        version="0.1.0",
        summary="Upload an ONNX model, get it optimized (fusion, FP16, INT8) with proof, and served on ONNX Runtime.",
        lifespan=lifespan,
        redirect_slashes=False,  # a trailing slash is answered in place (without_trailing_slash), never redirected
    )
    app.state.settings = settings = settings or Settings()
    keys = load_api_keys(settings.api_keys.get_secret_value(), settings.api_keys_file)
    app.state.services = None
    install_error_handlers(app)
    app.include_router(v2.router)
    app.include_router(models.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    install_dashboard(app)
    install_security(app, settings, keys)
    # Outermost: the key check's 401/403 and the body limit's 413 are answers too, counted with their status.
    app.add_middleware(HttpMetricsMiddleware, routes=lambda: app.router.routes,
                       metrics=lambda: app.state.services.metrics if app.state.services else None)
    app.guard = guard_of(not keys.enabled, cors_origins(settings))
    if not cors_origins(settings):
        app.fast_infer = FastInfer(app, keys, settings.max_predict_body_bytes)
    return app


app = create_app()

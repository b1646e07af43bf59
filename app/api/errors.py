"""The one place errors become HTTP answers, all shaped `{"error": "..."}`.

ServiceError subclasses carry their status (and any headers, e.g. Retry-After); optimizer errors mean
the user's model or data is bad (400); FastAPI's validation errors are a malformed request (422);
unknown routes 404 in the same shape. A database that cannot be reached is 503 with Retry-After and one
log line (not a traceback): an outage, not a bug. Anything else is our bug: 500 with a generic message, and the
traceback in the log.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    DATABASE_UNREACHABLE,
    DATABASE_UNREACHABLE_MESSAGE,
    DatabaseUnreachableError,
    ServiceError,
)
from optimizer.errors import OptimizerError, first_line

log = logging.getLogger("onnxforge.api")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def error_of(exc: Exception, where: str) -> tuple[int, str, dict[str, str] | None]:
    """Status, message and headers of the answer to an exception a route raised (`where`: method and path,
    for the log). The exception handlers below and the fast infer path (app/fastpath.py) both answer by it."""
    if isinstance(exc, ServiceError):
        if isinstance(exc, DatabaseUnreachableError):
            pass  # its outage was logged once where it was noticed: a line per request would flood the log
        elif exc.status_code == 503:  # busy or not ready yet: expected, the client is told to retry
            log.warning("%s: %s", type(exc).__name__, exc)
        elif exc.status_code >= 500:
            log.error("%s: %s", type(exc).__name__, exc)
        return exc.status_code, str(exc), exc.headers
    if isinstance(exc, OptimizerError):
        return 400, str(exc), None
    if isinstance(exc, DATABASE_UNREACHABLE):  # a route that needs the database during an outage
        log.warning("%s: database unreachable: %s", where, first_line(exc))
        # the driver's words (host, port, database name) stay in the log
        return 503, DATABASE_UNREACHABLE_MESSAGE, DatabaseUnreachableError.headers
    log.error("unhandled error on %s", where, exc_info=exc)
    return 500, f"internal error ({type(exc).__name__}); the server log has the details", None


def _answer(exc: Exception, request: Request) -> JSONResponse:
    return error_response(*error_of(exc, f"{request.method} {request.url.path}"))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "malformed request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _answer(exc, request)

    @app.exception_handler(OptimizerError)
    async def _optimizer_error(request: Request, exc: OptimizerError) -> JSONResponse:
        return _answer(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such route: {request.method} {request.url.path} (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path} (see /docs)"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    async def _database_unreachable(request: Request, exc: Exception) -> JSONResponse:
        return _answer(exc, request)

    # Each class by name: what the catch-all below answers, Starlette re-raises after (a traceback per request).
    for unreachable in DATABASE_UNREACHABLE:
        app.add_exception_handler(unreachable, _database_unreachable)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _answer(exc, request)

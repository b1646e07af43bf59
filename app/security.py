"""Access control and request-size limits, as ASGI middleware in front of every route.

Middleware rather than a FastAPI dependency because it matches path prefixes (/v1, /v2): routes added
later, including the plain Starlette /v2 infer routes, are covered without anyone remembering to
add a dependency. Pure ASGI (no BaseHTTPMiddleware) so that it costs a predict almost nothing.
The fast infer path (app/fastpath.py), in front of these middlewares, decides by the same
`check_key` and `body_limit_message`.

Keys come from ONNXFORGE_API_KEYS and/or a file (ONNXFORGE_API_KEYS_FILE), entries `role:key`
(role `read` or `admin`; a bare key is admin). With no keys configured the service is open, as a
single-machine tool on 127.0.0.1 expects. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.api.errors import error_response
from app.errors import ServiceError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

READ, ADMIN = "read", "admin"
PROTECTED_PREFIXES = ("/v1/", "/v2/")
OPEN_PREFIXES = ("/v2/health/",)  # probes of load balancers and KServe carry no key
# POSTs that only read: running a model is what a read-only key is for.
_READ_POST_SUFFIXES = ("/predict", "/infer")
# /v2 POSTs that change nothing a read key could not: the repository index (a list), load (the serving version's
# session now, as its first infer would) and shared-memory unregister (none is ever registered). tritonclient sends
# them as POSTs; without this a read key got a 403 about uploading.
_READ_POSTS = re.compile(r"^/v2/(repository/index|repository/models/[^/]+/load"
                         r"|(system|cuda)sharedmemory(/region/[^/]+)?/unregister)/?$")


class ApiKeyConfigError(ValueError):
    """The configured keys cannot be parsed; the service refuses to start rather than run open."""


@dataclass(frozen=True)
class ApiKeys:
    """Digests of the configured keys with their roles. Digests, so that comparison is length-independent."""

    digests: tuple[tuple[bytes, str], ...]

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def role_of(self, key: str) -> str | None:
        """The key's role, or None. Compares against every key, without early exit, in constant time."""
        given = hashlib.sha256(key.encode()).digest()
        found = None
        for digest, role in self.digests:
            if hmac.compare_digest(given, digest) and found != ADMIN:
                found = role
        return found


def parse_api_keys(text: str, source: str = "ONNXFORGE_API_KEYS") -> ApiKeys:
    """Parse `role:key` entries separated by commas or newlines; `#` starts a comment line."""
    digests = []
    for raw in text.replace(",", "\n").splitlines():
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        role, sep, key = entry.partition(":")
        if not sep:
            role, key = ADMIN, entry
        role, key = role.strip().lower(), key.strip()
        if role not in (READ, ADMIN):
            raise ApiKeyConfigError(f"{source}: unknown role {role!r} in an entry (use read:<key> or admin:<key>)")
        if len(key) < 16:
            raise ApiKeyConfigError(f"{source}: an API key is shorter than 16 characters; use a long random one "
                                    "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        digests.append((hashlib.sha256(key.encode()).digest(), role))
    return ApiKeys(tuple(digests))


def load_api_keys(inline: str, file: Path | None) -> ApiKeys:
    """Keys from the setting and the file together."""
    keys = parse_api_keys(inline)
    if file is not None:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise ApiKeyConfigError(f"ONNXFORGE_API_KEYS_FILE: cannot read {file}: {exc.strerror}") from None
        keys = ApiKeys(keys.digests + parse_api_keys(text, f"ONNXFORGE_API_KEYS_FILE ({file})").digests)
    return keys


def required_role(method: str, path: str) -> str | None:
    """Which role a request needs: None (open), READ or ADMIN."""
    if not (path + "/").startswith(PROTECTED_PREFIXES) or path.startswith(OPEN_PREFIXES):
        return None
    # A trailing slash is the same route (app/main.py answers it in place, no redirect): the same role, not admin.
    if method in ("GET", "HEAD", "OPTIONS") or (
            method == "POST" and (path.rstrip("/").endswith(_READ_POST_SUFFIXES) or _READ_POSTS.match(path))):
        return READ
    return ADMIN


class MissingKeyError(ServiceError):
    status_code = 401
    headers = {"WWW-Authenticate": 'Bearer realm="onnxforge"'}


class ReadOnlyKeyError(ServiceError):
    status_code = 403


def check_key(keys: ApiKeys, needed: str, authorization: bytes) -> None:
    """Raise MissingKeyError (401) or ReadOnlyKeyError (403) unless the `Authorization` header's value
    carries a key with the `needed` role. The middleware and the fast infer path (app/fastpath.py) both
    decide by it."""
    scheme, _, key = authorization.decode("latin-1").partition(" ")
    key = key.strip()
    role = keys.role_of(key) if scheme.lower() == "bearer" and key else None
    if role is None:
        raise MissingKeyError("missing or invalid API key: send `Authorization: Bearer <key>`")
    if needed == ADMIN and role != ADMIN:
        raise ReadOnlyKeyError("this API key is read-only: uploading, deleting and pinning a version need an admin key")


def body_limit_message(limit: int) -> str:
    return (f"the request body is larger than the predict limit of {limit} bytes "
            "(ONNXFORGE_MAX_PREDICT_BODY_BYTES): send fewer rows per request")


def cors_origins(settings: Any) -> list[str]:  # noqa: ANN401 - app.settings.Settings
    return [o.strip() for o in settings.cors_origins.split(",") if o.strip()]


async def _answer(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                  headers: dict[str, str] | None = None) -> None:
    """The service's one error shape, as app/api/errors.py answers it (and the fast infer path)."""
    await error_response(status, message, headers)(scope, receive, send)


class ApiKeyMiddleware:
    """401 without a valid `Authorization: Bearer <key>`, 403 for a read-only key on an admin route.

    Answers before the route runs (and before the body is read), so a refused request touches nothing.
    """

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled:
            await self.app(scope, receive, send)
            return
        needed = required_role(scope["method"], scope["path"])
        if needed is None:
            await self.app(scope, receive, send)
            return
        try:
            check_key(self.keys, needed, next((v for k, v in scope["headers"] if k == b"authorization"), b""))
        except ServiceError as exc:
            await _answer(scope, receive, send, exc.status_code, str(exc), exc.headers)
            return
        await self.app(scope, receive, send)


class PredictBodyLimitMiddleware:
    """413 for a predict/infer body over the limit, by Content-Length or, when chunked, as it streams in.

    Uploads have their own per-file limits (max_model_bytes, max_calibration_bytes) in the multipart parser.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith(_READ_POST_SUFFIXES):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        message = body_limit_message(limit)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            await _answer(scope, receive, send, 413, message)
            return
        seen = 0
        exceeded = answered = False

        async def limited_receive() -> Message:
            nonlocal seen, exceeded
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return received

        async def guarded_send(sent: Message) -> None:
            # A route may turn the receive error into its own answer (FastAPI: 400 "error parsing the
            # body"): once over the limit, whatever it answers is replaced by the 413.
            nonlocal answered
            if not exceeded:
                await send(sent)
            elif not answered and sent["type"] == "http.response.start":
                answered = True
                await _answer(scope, receive, send, 413, message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not answered:
                await _answer(scope, receive, send, 413, message)


class _BodyTooLarge(Exception):
    pass


def install_security(app: Any, settings: Any, keys: ApiKeys) -> None:  # noqa: ANN401 - FastAPI app, Settings
    """Add the body limit, the key check and (when origins are set) CORS, CORS outermost.

    CORS must wrap the key check: a browser's preflight carries no key, and a 401 needs CORS headers
    for the page to see it.
    """
    from starlette.middleware.cors import CORSMiddleware

    app.add_middleware(PredictBodyLimitMiddleware, max_bytes=settings.max_predict_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=keys)
    origins = cors_origins(settings)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Inference-Header-Content-Length"])

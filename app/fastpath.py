"""The hot path: `POST /v2/models/{name}[/versions/{version}]/infer` and `POST /v1/models/{name}[/versions/
{version}]/predict` answered in one ASGI callable, in front of the whole FastAPI/Starlette stack.

WHY: on a small model the layers around the predict routes cost more of the event loop than the route does
(measured in-process with `bench/serving.py --in-process`: ServerErrorMiddleware, FastAPI's telemetry
check, API keys, the body limit, the metrics send-wrapper, ExceptionMiddleware, AsyncExitStack, route
matching by regex, FastAPI's dependencies). With 32 clients the event loop, not ONNX Runtime, is the limit,
so every microsecond of it per request is throughput, batched or not.

Here, in one place, is everything those layers do for such a request: the API key (`check_key`, the
same roles, 401/403 bodies and WWW-Authenticate), the predict body limit (413 by Content-Length and while
the body streams in), the HTTP request count under the route's template, and errors in the service's one
shape (`error_of`: ServiceError statuses and headers, OptimizerError 400, anything else 500 and logged).
The routes themselves (`app.api.v2.infer`, `app.api.models.predict_json`: raw body in, answer out) are
shared with the normal stack's routes.

Off when CORS origins are set: CORS rules (preflights, which origin gets which headers) stay with
Starlette's middleware, and the normal stack answers every request. Other paths (and any request under
a root path) go to the normal stack untouched.
"""

from __future__ import annotations

import asyncio
from typing import Any

from app.api.errors import error_of, error_response
from app.api.models import PREDICT, VERSION_PREDICT, predict_json
from app.api.v2 import INFER, VERSION_INFER, infer, read_body
from app.errors import NotReadyError, PayloadTooLargeError
from app.protocol.v2_codec import HEADER_LENGTH
from app.security import READ, ApiKeys, Receive, Scope, Send, body_limit_message, check_key

_HEADER_LENGTH = HEADER_LENGTH.encode()
STOPPING = "the service is stopping"
# (path prefix, path suffix, route template, its versioned template): the routes the fast path answers.
_ROUTES = (("/v2/models/", "/infer", INFER, VERSION_INFER), ("/v1/models/", "/predict", PREDICT, VERSION_PREDICT))


def fast_target(path: str) -> tuple[str, str, str | None] | None:
    """(route template, model name, version text or None) when `path` is a /v2 infer or /v1 predict path,
    else None.

    Matches exactly what the router's templates match (`{name}` and `{version}`: one non-empty segment).
    """
    for prefix, suffix, plain, versioned in _ROUTES:
        if not (path.startswith(prefix) and path.endswith(suffix)) or len(path) <= len(prefix) + len(suffix):
            continue
        parts = path[len(prefix):-len(suffix)].split("/")
        if len(parts) == 1 and parts[0]:
            return plain, parts[0], None
        if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
            return versioned, parts[0], parts[2]
        return None
    return None


class FastInfer:
    """Answers /v2 infer and /v1 predict requests for `app` (whose `state.services` the lifespan sets) with its
    keys and body limit."""

    def __init__(self, app: Any, keys: ApiKeys, max_body_bytes: int) -> None:  # noqa: ANN401 - the FastAPI app
        self.state = app.state
        self.keys = keys
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send, target: tuple[str, str, str | None]) -> None:
        template, name, version = target
        services = self.state.services
        status, started = 500, False
        try:
            authorization, length, header_length, encoding = b"", None, None, None
            for key, value in scope["headers"]:  # one pass for every header this path reads
                if key == _HEADER_LENGTH:
                    header_length = value.decode("latin-1")
                elif key == b"content-length":
                    length = value
                elif key == b"authorization":
                    authorization = value
                elif key == b"content-encoding":
                    encoding = value.decode("latin-1").strip().lower()
            if self.keys.enabled:
                check_key(self.keys, READ, authorization)  # running a model is what a read key is for (required_role)
            if services is None:  # after the key: a client without one learns nothing of the service's state
                raise NotReadyError("the service is starting or stopping")
            limit = self.max_body_bytes
            if length is not None and length.isdigit() and int(length) > limit:
                raise PayloadTooLargeError(body_limit_message(limit))
            body = await read_body(receive, limit)
            if template in (PREDICT, VERSION_PREDICT):
                content, headers = await predict_json(services, name, version, body, scope.get("query_string", b""))
            else:  # /v2 infer: the binary extension's header length and Content-Encoding say how to read the body
                content, headers = await infer(services, name, version, body, header_length, encoding, limit)
            started = True
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            status = 200
            await send({"type": "http.response.body", "body": content})
        except asyncio.CancelledError:
            # uvicorn cancels what its graceful shutdown did not finish: a 503 that a proxy (nginx) replays on another
            # replica, not uvicorn's plain-text 500 and a traceback. Not raised on: the answer is this request's end.
            status = 503
            if not started:
                await error_response(503, STOPPING, {"Retry-After": "1"})(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - every error is answered in the one shape; the server goes on
            status, message, headers = error_of(exc, f"POST {scope['path']}")
            if not started:
                await error_response(status, message, headers)(scope, receive, send)
        finally:
            if services is not None:
                services.metrics.count_http("POST", template, str(status))

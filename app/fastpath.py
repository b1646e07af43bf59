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

Two drivers share these rules (`admit` before the body, `run` once it is whole, `failure` for the answer to an
error, and the count): `FastInfer.__call__`, the ASGI one (TestClient, other ASGI servers, requests uvicorn keeps
in its own cycle), and under uvicorn the short path of app/http_protocol.py, which answers from the HTTP
parser's callbacks without building an ASGI request at all.

Off when CORS origins are set: CORS rules (preflights, which origin gets which headers) stay with
Starlette's middleware, and the normal stack answers every request. Other paths (and any request under
a root path) go to the normal stack untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.api.errors import error_of, error_response
from app.api.models import PREDICT, VERSION_PREDICT, predict_json
from app.api.v2 import INFER, VERSION_INFER, _version, infer, read_body
from app.errors import NotFoundError, NotReadyError, PayloadTooLargeError
from app.protocol.v2_codec import HEADER_LENGTH, InferRequest, decode_request, encode_response, response_headers
from app.runtime.batching import Waiter
from app.security import READ, ApiKeys, Receive, Scope, Send, body_limit_message, check_key
from app.services.container import Services
from app.services.predict import PredictService, large

_HEADER_LENGTH = HEADER_LENGTH.encode()
STOPPING = "the service is stopping"
# (path prefix, path suffix, route template, its versioned template): the routes the fast path answers.
_ROUTES = (("/v2/models/", "/infer", INFER, VERSION_INFER), ("/v1/models/", "/predict", PREDICT, VERSION_PREDICT))


Target = tuple[str, str, str | None]  # fast_target's answer: route template, model name, version text or None
# FastInfer.enqueue's answer: the route, when the predict started, the output names, the decoded request
Batched = tuple[Any, float, tuple[str, ...] | list[str], InferRequest]


def fast_target(path: str) -> Target | None:
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


class Headers(NamedTuple):
    """What the fast path reads from a request's headers."""

    authorization: bytes
    length: bytes | None  # Content-Length as sent
    header_length: str | None  # the binary extension's Inference-Header-Content-Length
    encoding: str | None  # Content-Encoding, stripped and lower-case
    host: bytes | None  # Host, Origin, Sec-Fetch-Site as sent: app/origin_guard.py decides by them
    origin: bytes | None
    fetch_site: bytes | None


def headers_of(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """One pass over the (lower-case) request headers for every one this path reads."""
    authorization, length, header_length, encoding = b"", None, None, None
    host = origin = fetch_site = None
    for key, value in headers:
        if key == _HEADER_LENGTH:
            header_length = value.decode("latin-1")
        elif key == b"content-length":
            length = value
        elif key == b"authorization":
            authorization = value
        elif key == b"content-encoding":
            encoding = value.decode("latin-1").strip().lower()
        elif key == b"host":
            host = value
        elif key == b"origin":
            origin = value
        elif key == b"sec-fetch-site":
            fetch_site = value
    return Headers(authorization, length, header_length, encoding, host, origin, fetch_site)


WATCH_AFTER_S = 0.5  # how old a request gets before the fast path watches for its client's disconnect


class FastInfer:
    """Answers /v2 infer and /v1 predict requests for `app` (whose `state.services` the lifespan sets) with its
    keys and body limit."""

    def __init__(self, app: Any, keys: ApiKeys, max_body_bytes: int) -> None:  # noqa: ANN401 - the FastAPI app
        self.state = app.state
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        # Disconnects: a request whose client went away is cancelled, so that, queued behind a slow model's runs, it
        # is never run (answered to nobody, it would hold the model's slot up to the time limit, blocking the
        # requests behind it). The run already in ONNX Runtime goes on to its end or time limit. Watched only from
        # WATCH_AFTER_S on, by one sweep for all: a watch per request (a task awaiting `receive`, or a timer) would
        # cost every quick request's event loop time; a dict entry costs ~0.1 us.
        self._waiting: dict[asyncio.Task, tuple[Receive, int]] = {}  # in predict: its receive, the sweep it met
        self._watchers: dict[asyncio.Task, asyncio.Task] = {}
        self._gone: set[asyncio.Task] = set()
        self._sweeps = 0
        self._sweep_loop: asyncio.AbstractEventLoop | None = None  # the loop a sweep is scheduled on, if any

    def _sweep(self) -> None:
        """Every WATCH_AFTER_S while requests are in predict: watch the client of each that was already there at
        the previous sweep."""
        self._sweeps += 1
        for task, (receive, met) in self._waiting.items():
            if self._sweeps - met >= 2 and task not in self._watchers:
                self._watchers[task] = asyncio.get_running_loop().create_task(self._watch(task, receive))
        if self._waiting:
            asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._sweep)
        else:
            self._sweep_loop = None

    async def _watch(self, task: asyncio.Task, receive: Receive) -> None:
        # The body is read: the server's next message is http.disconnect, when the client goes away (or once the
        # response is complete: by then the request has left _waiting, and its watcher is cancelled).
        if (await receive())["type"] == "http.disconnect" and task in self._waiting:
            self._gone.add(task)
            task.cancel()

    def admit(self, headers: Headers) -> Services:
        """The checks before the body is read: the API key, readiness, the body limit by Content-Length. Raises
        the service's errors; returns the services that answer the request."""
        if self.keys.enabled:
            check_key(self.keys, READ, headers.authorization)  # running a model is what a read key is for
        services = self.state.services
        if services is None:  # after the key: a client without one learns nothing of the service's state
            raise NotReadyError("the service is starting or stopping")
        length = headers.length
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise PayloadTooLargeError(body_limit_message(self.max_body_bytes))
        return services

    async def run(self, services: Services, target: Target, headers: Headers, body: bytes,
                  query: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The answer's body and headers to a whole request body (raises the service's errors)."""
        template, name, version = target
        if template in (PREDICT, VERSION_PREDICT):
            return await predict_json(services, name, version, body, query)
        # /v2 infer: the binary extension's header length and Content-Encoding say how to read it
        return await infer(services, name, version, body, headers.header_length, headers.encoding,
                           self.max_body_bytes)

    def enqueue(self, services: Services, target: Target, headers: Headers, body: bytes,
                waiter: Waiter) -> Batched | None:
        """A /v2 infer request of a model whose requests are batched, decoded, checked and in its batch queue (what
        `run` does up to the run): its outputs come to `waiter` (Batcher.enqueue), for `outputs` and `encode`. Raises
        the service's errors as `run` does. None: not such a request, or not at hand without a coroutine (`run` in a
        task is its way). WHY: the short HTTP path answers it from its batch's callback (app/http_protocol.py)."""
        template, name, version = target
        if template in (PREDICT, VERSION_PREDICT) or (headers.encoding or "identity") != "identity":
            return None
        try:
            number = _version(version, name)
        except NotFoundError:  # said by `run`, in the order it checks things
            return None
        route = services.predict.batched_route(name, number)
        if route is None:
            return None
        request = decode_request(body, headers.header_length)
        started, names = services.predict.enqueue(route, request.inputs, request.outputs, waiter)
        return route, started, names, request

    @staticmethod
    def outputs(batched: Batched, values: list[np.ndarray] | None, exc: BaseException | None) -> dict[str, np.ndarray]:
        """The outputs of an `enqueue`d request from what its batch gave it (raises the service's error, as `run`)."""
        route, started, names, _ = batched
        return PredictService.finish(route, started, names, values, exc)

    @staticmethod
    def encode(batched: Batched, outputs: dict[str, np.ndarray]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The answer's body and headers, as `run` gives them (not for `large` outputs: `encoded`)."""
        route, _, _, request = batched
        content, length = encode_response(route.name, route.version, request, outputs)
        return content, response_headers(len(content), length)

    @staticmethod
    async def encoded(batched: Batched, outputs: dict[str, np.ndarray]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """`encode`, in a thread for `large` outputs (as `run` encodes them)."""
        if not large(outputs):
            return FastInfer.encode(batched, outputs)
        route, _, _, request = batched
        content, length = await run_in_threadpool(encode_response, route.name, route.version, request, outputs)
        return content, response_headers(len(content), length)

    @staticmethod
    def failure(exc: BaseException, gone: bool, where: str) -> tuple[int, JSONResponse | None]:
        """The status of a request that raised `exc` (`where`: method and path, for the log) and its answer (None:
        nobody to answer).

        Cancelled: uvicorn cancels what its graceful shutdown did not finish: a 503 that a proxy (nginx) replays
        on another replica, not uvicorn's plain-text 500 and a traceback. Or the client went away (`gone`):
        nobody to answer, counted as nginx logs it, 499. Any other error in the service's one shape."""
        if isinstance(exc, asyncio.CancelledError):
            return (499, None) if gone else (503, error_response(503, STOPPING, {"Retry-After": "1"}))
        status, message, headers = error_of(exc, where)
        return status, error_response(status, message, headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send, target: Target) -> None:
        """The ASGI driver of the request (TestClient, other ASGI servers, and uvicorn where app/http_protocol.py
        leaves a request to uvicorn's cycle)."""
        services = self.state.services
        status, started = 500, False
        task = None
        try:
            headers = headers_of(scope["headers"])
            services = self.admit(headers)
            body = await read_body(receive, self.max_body_bytes)
            loop = asyncio.get_running_loop()
            if self._sweep_loop is not loop:
                self._sweep_loop = loop
                loop.call_later(WATCH_AFTER_S, self._sweep)
            task = asyncio.current_task()
            self._waiting[task] = (receive, self._sweeps)
            try:
                content, answer = await self.run(services, target, headers, body, scope.get("query_string", b""))
            finally:
                del self._waiting[task]
                if self._watchers and (watcher := self._watchers.pop(task, None)) is not None:
                    watcher.cancel()
            started = True
            await send({"type": "http.response.start", "status": 200, "headers": answer})
            status = 200
            await send({"type": "http.response.body", "body": content})
        except asyncio.CancelledError as exc:  # not raised on: the answer is this request's end
            status, response = self.failure(exc, task in self._gone, "")
            self._gone.discard(task)
            if not started and response is not None:
                await response(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - every error is answered in the one shape; the server goes on
            status, response = self.failure(exc, False, f"POST {scope['path']}")
            if not started and response is not None:
                await response(scope, receive, send)
        finally:
            if services is not None:
                services.metrics.count_http("POST", target[0], str(status))

"""uvicorn's httptools protocol, with each response's head and first body chunk sent in one write.

WHY: uvicorn writes a response's head (status line and headers) when the app sends `http.response.start`
and its body when the app sends `http.response.body`, and uvloop's transport writes each at once: two
send() syscalls and two TCP segments per answer, and on loopback the kernel delivers each segment to the
client inside the sending call. For a small model's predict that second write was a large part of the
event loop's kernel time (perf: ~12% of the server's samples in write() at c=32); holding the head until the
body comes makes one write of both (and the client reads one segment, not two).

Nothing else changes: the head is held only between the two messages of one response (a streamed
response's head goes out with its first chunk), the same bytes go out in the same order, and a close
uvicorn asks for while the head is held happens after it is written.

The short path (`_Request`): a /v2 infer or /v1 predict request (exactly the paths app/fastpath.py's `fast_target`
matches, when the app's fast path is on) is answered from the parser's callbacks, without uvicorn's ASGI cycle: no
scope dict, no RequestResponseCycle, no ASGI messages, one task per request (started once the body is whole, for
the model's run) instead of uvicorn's task woken for each body message. WHY: on a small model the event loop, not
ONNX Runtime, limits a server (py-spy at c=32: ~25% of its thread in uvicorn's cycle), and batching only saves
the run, so every microsecond of HTTP per request is throughput, batched or not. The checks and answers are
FastInfer's own (`admit`, `run`, `failure`: keys, readiness, body limit, the one error shape, 503 on shutdown,
499 for a client gone, /metrics' count), so the short path and the ASGI fast path answer alike, byte for byte.

Only the common case takes it: a keep-alive or `Connection: close` HTTP/1.1 POST that arrives when no other request
of its connection is in flight. Everything else goes through uvicorn's cycle as before: other paths and methods,
HTTP/1.0, `Expect: 100-continue`, upgrades, a request pipelined behind another (uvicorn queues it and pauses
reading, as it does behind its own cycles), a root path, `limit_concurrency`.
Differences from uvicorn's cycle: the body is held until it is whole (up to the body limit, as FastInfer reads
it) without pausing reading at 64 KiB; a client gone is seen at once (its request cancelled, 499), not from
WATCH_AFTER_S on; a client gone before sending its whole body counts 499 (the ASGI path: 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
import numpy as np
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from app.errors import PayloadTooLargeError
from app.fastpath import Batched, FastInfer, Headers, Target, fast_target, headers_of
from app.origin_guard import SECURITY_HEADERS
from app.security import body_limit_message
from app.services.container import Services
from app.services.predict import large

Answer = tuple[bytes, list[tuple[bytes, bytes]]]  # an answer's body and headers


class _Held:
    """Stands in for the transport while a response's head waits for its body: collects what uvicorn writes."""

    __slots__ = ("closed", "parts", "transport")

    def __init__(self, transport: Any) -> None:  # noqa: ANN401 - an asyncio transport
        self.transport = transport
        self.parts: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed or self.transport.is_closing()


class _OneWriteCycle(RequestResponseCycle):
    """A request's cycle whose response head is written together with the first body chunk."""

    head: _Held | None = None  # the head uvicorn wrote, not sent yet

    async def send(self, message: Any) -> None:  # noqa: ANN401 - an ASGI message
        held = self.head
        if held is None and (message["type"] != "http.response.start" or self.response_started):
            await super().send(message)
            return
        # The head goes into `held`; then the body joins it there and both go out. The real transport is put back
        # after each message: if the app fails between the two, uvicorn closes the connection as before.
        transport = self.transport
        if held is None:
            held = _Held(transport)
        self.transport, self.head = held, None
        try:
            await super().send(message)
        finally:
            self.transport = transport
        if not self.response_started or held.closed or message["type"] != "http.response.start":
            _release(held)
        else:
            self.head = held


def _release(held: _Held) -> None:
    """Write what was held (one write) and close if uvicorn closed."""
    if held.parts:
        held.transport.write(held.parts[0] if len(held.parts) == 1 else b"".join(held.parts))
    if held.closed:
        held.transport.close()


class _NoEvent:
    """What a lost connection sets on its request (uvicorn wakes its cycle's `receive` so): a short request waits
    on nothing; its task is cancelled instead."""

    __slots__ = ()

    def set(self) -> None:
        pass


class _Request:
    """One request on the short path (module doc), from its headers to its answer.

    It is the protocol's `cycle` meanwhile, in place of uvicorn's RequestResponseCycle, so that uvicorn's own
    bookkeeping goes on unchanged: a request pipelined behind it waits until `response_complete`, a graceful
    shutdown clears `keep_alive` (closed once answered), a lost connection sets `disconnected`."""

    __slots__ = ("batched", "body", "disconnected", "headers", "keep_alive", "path", "protocol", "query",
                 "response_complete", "services", "size", "target", "task")
    message_event = _NoEvent()

    def __init__(self, protocol: OneWriteHttpToolsProtocol, target: Target, path: str, query: bytes,
                 keep_alive: bool, headers: Headers) -> None:
        self.protocol = protocol
        self.target = target
        self.path = path
        self.query = query
        self.keep_alive = keep_alive
        self.headers = headers
        self.body: list[bytes] = []
        self.size = 0
        self.services: Services | None = None  # once admitted
        self.task: asyncio.Task | None = None  # once the body is whole, unless batched
        self.batched: Batched | None = None  # while in a batch (FastInfer.enqueue): it is the batch's waiter
        self.response_complete = False
        self.disconnected = False

    def start(self) -> None:
        """Once the body is whole: into its model's batch queue, answered from the batch's callback (`set_result`),
        when FastInfer.enqueue takes it; else `answer` in a task. Either way it is in uvicorn's `tasks` until
        answered: its graceful shutdown waits for it, then cancels it (503)."""
        protocol = self.protocol
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        try:
            self.batched = protocol.fast.enqueue(self.services, self.target, self.headers, body, self)
        except Exception as exc:  # noqa: BLE001 - every error is answered in the one shape; the server goes on
            self.fail(exc)
            return
        if self.batched is not None:
            protocol.tasks.add(self)  # (a stand-in for a task there: `cancel` is what uvicorn calls)
            return
        context = contextvars.Context() if protocol.config.reset_contextvars else None  # as uvicorn's _start_asgi_task
        self.later(functools.partial(protocol.fast.run, self.services, self.target, self.headers, body, self.query),
                   context)

    def later(self, answer: Callable[[], Awaitable[Answer]], context: contextvars.Context | None = None) -> None:
        """Answer by what `answer()` gives, in a task (uvicorn's graceful shutdown waits for it, then cancels it)."""
        protocol = self.protocol
        self.task = task = protocol.loop.create_task(self.answer(answer), context=context)
        task.add_done_callback(protocol.tasks.discard)
        protocol.tasks.add(task)

    async def answer(self, answer: Callable[[], Awaitable[Answer]]) -> None:
        """The model's answer (or the error's) to the whole request, written in one write."""
        fast = self.protocol.fast
        try:
            content, headers = await answer()
            flow = self.protocol.flow
            if flow.write_paused:  # a client that does not read its answers: wait, as uvicorn's cycle does
                await flow.drain()
        except asyncio.CancelledError as exc:  # not raised on: the answer is this request's end
            self.respond(*fast.failure(exc, self.disconnected, ""))
        except Exception as exc:  # noqa: BLE001 - every error is answered in the one shape; the server goes on
            self.fail(exc)
        else:
            self.write(200, headers, content)
            self.count(200)

    # -- as the waiter of its batch (Batcher.enqueue): called on the event loop ----------------------------------

    def done(self) -> bool:
        return self.batched is None

    def set_result(self, values: list[np.ndarray]) -> None:
        self._batch_done(values, None)

    def set_exception(self, exc: BaseException) -> None:
        self._batch_done(None, exc)

    def _batch_done(self, values: list[np.ndarray] | None, exc: BaseException | None) -> None:
        """Its batch ran: answer now (one write), as `answer` would have; a large answer, or one to a client that
        does not read its answers, goes on in a task (encoded in a thread, written once the client reads)."""
        batched, self.batched = self.batched, None
        protocol = self.protocol
        protocol.tasks.discard(self)
        fast = protocol.fast
        try:
            outputs = fast.outputs(batched, values, exc)
            if protocol.flow.write_paused or large(outputs):
                self.later(functools.partial(fast.encoded, batched, outputs))
                return
            content, headers = fast.encode(batched, outputs)
        except Exception as exc:  # noqa: BLE001 - every error is answered in the one shape; the server goes on
            self.fail(exc)
        else:
            self.write(200, headers, content)
            self.count(200)

    def cancel(self, msg: str | None = None) -> None:
        """uvicorn's graceful shutdown gave up waiting for it: out of its batch (not run if not started), 503. Soon,
        not now, as a task's cancel: uvicorn calls it while iterating over its tasks, which `stop` changes."""
        self.protocol.loop.call_soon(self.stop, False)

    def stop(self, gone: bool) -> None:
        """Out of its batch, not answered by it (not run if its batch has not started): its client is gone (499,
        nobody to answer) or the server is stopping (503), as a cancelled task is answered."""
        batched, self.batched = self.batched, None
        if batched is None:
            return
        self.protocol.tasks.discard(self)
        exc = asyncio.CancelledError()
        with contextlib.suppress(asyncio.CancelledError):
            self.protocol.fast.outputs(batched, None, exc)  # counts the predict (rejected)
        self.respond(*self.protocol.fast.failure(exc, gone, ""))

    def fail(self, exc: Exception) -> None:
        self.respond(*self.protocol.fast.failure(exc, False, f"POST {self.path}"))

    def respond(self, status: int, response: JSONResponse | None) -> None:
        """Answer by `response` (None: nobody to answer) and count it."""
        if response is None:
            self.response_complete = True
        else:
            self.write(status, response.raw_headers, response.body)
        self.count(status)

    def count(self, status: int) -> None:
        services = self.services or self.protocol.fast.state.services  # a refused request was counted as well
        if services is not None:
            services.metrics.count_http("POST", self.target[0], str(status))

    def write(self, status: int, headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        """Status line, uvicorn's default headers (date), the answer's headers and body: one write, as uvicorn's
        cycle would have written them (module doc of _OneWriteCycle); then what uvicorn does once a response is
        complete (close, or the next pipelined request, or the keep-alive timeout)."""
        self.response_complete = True
        protocol = self.protocol
        transport = protocol.transport
        if transport.is_closing():
            protocol.on_response_complete()  # counts it in uvicorn's total (limit_max_requests), as uvicorn does
            return
        parts = [STATUS_LINE[status]]
        for name, value in protocol.server_state.default_headers:
            parts += (name, b": ", value, b"\r\n")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(_SECURITY)  # after the answer's own, as app/main.py adds them on the ASGI path
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", content)
        transport.write(b"".join(parts))
        if protocol.access_log:  # uvicorn's line (logged at the service's debug level only: settings.access_log)
            scope = {"client": protocol.client, "path": self.path, "query_string": self.query}
            protocol.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), "POST",
                                        get_path_with_query_string(scope), "1.1", status)
        if not self.keep_alive:
            transport.close()
        protocol.on_response_complete()


_SECURITY = b"".join(name + b": " + value + b"\r\n" for name, value in SECURITY_HEADERS)
_UNKNOWN = object()
# The longest a connection may take to send a request's head (request line and headers), from its connection or its
# request's first byte. WHY: uvicorn has no such limit, so a connection that sends nothing, or a header line now and
# then (slowloris), is held for ever: 19,990 of them used up a replica's 20,000 file descriptors and /healthz refused
# connections (security review), with no key needed. A real client sends its head in one segment; nginx's own
# default is 60 s, our replicas may also face clients directly.
HEAD_TIMEOUT_S = 10.0
# Request URL bytes -> (route template etc., path, query) of a request the short path answers, or None. WHY: clients
# send the same few URLs again and again; parsing one (httptools.parse_url, decode, fast_target) is a per-request cost
# of the event loop. Bounded: cleared when full (URLs with a query of their own only refill it).
_routes: dict[bytes, tuple[Target, str, bytes] | None] = {}
_ROUTES_MAX = 1024


def _route_of(url: bytes) -> tuple[Target, str, bytes] | None:
    """What `_routes` keeps for `url` (after keeping it): None when not a short path's, or unparsable (uvicorn's
    cycle then fails it as before; not kept)."""
    try:
        parsed = httptools.parse_url(url)
        path = parsed.path.decode("ascii")
    except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
        return None
    if "%" in path:
        path = urllib.parse.unquote(path)
    target = fast_target(path)
    route = None if target is None else (target, path, parsed.query or b"")
    if len(_routes) >= _ROUTES_MAX:
        _routes.clear()
    _routes[url] = route
    return route


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's `http="httptools"` protocol whose responses go out in one write, and whose predict requests take
    the short path (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401 - uvicorn's arguments
        super().__init__(*args, **kwargs)
        fast = getattr(self.app, "fast_infer", None)  # None: CORS on, or an app other than ours (wrapped, tests)
        # Where the app's fast path would not answer such a request by itself, or uvicorn adds to it: uvicorn's cycle.
        short = isinstance(fast, FastInfer) and not self.root_path and self.limit_concurrency is None
        self.fast: FastInfer | None = fast if short else None
        self.running: _Request | None = None  # the short request started last (its task runs or it is in a batch)
        self.idle_since: float | None = None  # loop time of the last response, while no data came since
        self.head_since: float | None = None  # loop time a request's head began (or the connection), until complete
        self.head_timer: asyncio.TimerHandle | None = None

    # -- the head timeout: one timer per connection, re-armed only when it fires ----------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.head_since = self.loop.time()
        self.head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_due)

    def _head_due(self) -> None:
        """Close a connection whose request head has been coming for HEAD_TIMEOUT_S (no answer: it has not asked
        anything yet); else look again when the head now coming would be due, or a timeout from now."""
        self.head_timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        due = HEAD_TIMEOUT_S if self.head_since is None else self.head_since + HEAD_TIMEOUT_S - now
        if due <= 0:
            self.transport.close()
            return
        self.head_timer = self.loop.call_later(due, self._head_due)

    def on_message_begin(self) -> None:
        self.head_since = self.loop.time()
        if self.fast is None:
            super().on_message_begin()
            return
        # No scope yet: built (_scope) only for a request that goes through uvicorn's cycle.
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def _scope(self) -> None:
        """The scope uvicorn's on_message_begin builds, with what the parser gave since."""
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.expect_100_continue = url, expect
        self.headers = self.scope["headers"] = headers

    def _short(self) -> _Request | None:
        """The request whose headers are complete, if it takes the short path (module doc)."""
        parser = self.parser
        if self.expect_100_continue or parser.get_method() != b"POST" or parser.get_http_version() != "1.1" \
                or parser.should_upgrade() or self.pipeline or self.flow.write_paused or self.transport.is_closing():
            return None  # (write_paused: a client not reading its answers; uvicorn's cycle waits for it)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # pipelined: uvicorn queues it
            return None
        route = _routes.get(self.url, _UNKNOWN)
        if route is _UNKNOWN:
            route = _route_of(self.url)
        if route is None:
            return None
        target, path, query = route
        return _Request(self, target, path, query, parser.should_keep_alive(), headers_of(self.headers))

    # -- the keep-alive timeout: one timer per idle spell, not one per request ---------------------------------------

    def on_response_complete(self) -> None:
        """uvicorn's, but the keep-alive timer is armed only when none is: WHY: uvicorn arms a timer after every
        response and cancels it when the next request's data comes (a TimerHandle made and cancelled per request,
        ~2.7 us of the event loop here); this one, when it fires, looks at how long the connection has been idle and
        closes it or waits for the rest. Same timeout, measured from the last response as uvicorn does."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            self.idle_since = None
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._keep_alive_due)

    def _unset_keepalive_if_required(self) -> None:
        self.idle_since = None  # busy (data came): the timer, if armed, finds it so and leaves the next response to it

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        if self.idle_since is None:
            return
        left = self.idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()

    def on_headers_complete(self) -> None:
        self.head_since = None
        if self.fast is not None:
            request = self._short()
            if request is not None:
                self.cycle = request
                try:
                    self.app.guard.check("POST", request.headers.host, request.headers.origin,
                                         request.headers.fetch_site, self.server)
                    request.services = self.fast.admit(request.headers)
                except Exception as exc:  # noqa: BLE001 - answered now, as the ASGI path answers before the body
                    request.fail(exc)
                return
            self._scope()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and type(cycle) is RequestResponseCycle:
            cycle.__class__ = _OneWriteCycle  # same attributes; only `send` differs (its task has not run yet)

    def on_body(self, body: bytes) -> None:
        request = self.cycle
        if type(request) is not _Request:
            super().on_body(body)
            return
        if request.response_complete:  # answered before its body ended (refused): the rest is dropped
            return
        request.size += len(body)
        if request.size > self.fast.max_body_bytes:
            request.fail(PayloadTooLargeError(body_limit_message(self.fast.max_body_bytes)))
            return
        request.body.append(body)

    def on_message_complete(self) -> None:
        request = self.cycle
        if type(request) is not _Request:
            super().on_message_complete()
            return
        if request.response_complete:
            return
        self.running = request
        request.start()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        running, self.running = self.running, None
        if running is not None and not running.response_complete:  # its client is gone: nobody to answer, 499
            running.disconnected = True
            if running.task is not None:
                running.task.cancel()
            else:
                running.stop(True)
        request = self.cycle
        if type(request) is _Request and request is not running and not request.response_complete:
            request.disconnected = True  # gone before the whole body came
            request.respond(499, None)

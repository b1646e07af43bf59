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
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


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


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's `http="httptools"` protocol whose responses go out in one write (module doc)."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and type(cycle) is RequestResponseCycle:
            cycle.__class__ = _OneWriteCycle  # same attributes; only `send` differs (its task has not run yet)

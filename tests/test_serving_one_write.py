"""app/http_protocol.py: a response's head and body go out in one write, with the same bytes as uvicorn's own
protocol, for plain, streamed, HEAD, failing and keep-alive responses; and the real service answers through it."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.http_protocol import OneWriteHttpToolsProtocol
from app.prefork import UVICORN_OPTIONS
from tests import models
from tests.service import running_service


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:  # noqa: ANN401
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)


async def _app(scope: dict, receive: Any, send: Any) -> None:  # noqa: ANN401
    await receive()
    path = scope["path"]
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for chunk in (b"one", b"two", b""):
            await send({"type": "http.response.body", "body": chunk, "more_body": chunk != b""})
        return
    if path == "/fail":  # head sent, then the app fails: uvicorn closes the connection
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        raise RuntimeError("the app failed mid-answer")
    body = b"hello " + path.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _exchange(protocol_class: type, requests: list[bytes]) -> _Transport:
    """Feed `requests` one after the other (keep-alive) to a protocol of `protocol_class`; its transport after."""

    async def main() -> _Transport:
        config = Config(_app, log_level="critical", **{k: v for k, v in UVICORN_OPTIONS.items() if k != "http"})
        config.load()
        transport = _Transport()
        protocol = protocol_class(
            config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
        )
        protocol.connection_made(transport)
        for request in requests:
            protocol.data_received(request)
            for _ in range(5):
                await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport

    return uvloop.run(main())


def _request(path: str, method: str = "GET", close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\n{connection}\r\n".encode()


@pytest.mark.parametrize(
    ("requests", "writes", "uvicorns"),
    [
        ([_request("/a"), _request("/b")], 2, 4),  # keep-alive: one write per answer; uvicorn's own: head, then body
        ([_request("/a", close=True)], 1, 2),
        ([_request("/a", method="HEAD")], 1, 1),
        ([_request("/stream")], 3, 4),  # head + "one", "two", the last chunk
    ],
)
def test_same_bytes_as_uvicorn_in_fewer_writes(requests: list[bytes], writes: int, uvicorns: int) -> None:
    ours, theirs = _exchange(OneWriteHttpToolsProtocol, requests), _exchange(HttpToolsProtocol, requests)
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    assert b"200 OK" in ours.writes[0]
    assert len(ours.writes) == writes
    assert len(theirs.writes) == uvicorns
    assert ours.closed == theirs.closed


def test_an_app_failing_after_the_head_closes_the_connection() -> None:
    ours = _exchange(OneWriteHttpToolsProtocol, [_request("/fail")])
    assert ours.closed
    assert b"".join(ours.writes) == b""  # the held head never goes out alone: the client sees a closed connection


def test_the_service_answers_through_it(tmp_path: Path) -> None:
    """The served app over a real socket: /v2 binary infer and a framework route, several on one connection."""
    assert UVICORN_OPTIONS["http"] == "app.http_protocol:OneWriteHttpToolsProtocol"
    import httpx

    model = models.mlp()
    feed = models.random_feed(model, batch=1)
    ((name, array),) = feed.items()
    with running_service(tmp_path) as (url, _):
        files = {"file": ("m.onnx", model.SerializeToString(), "application/octet-stream")}
        httpx.post(f"{url}/v1/models", files=files, data={"name": "m"}, timeout=60).raise_for_status()
        assert httpx.get(f"{url}/v2/models/m/ready", timeout=30).status_code == 200
        header = (
            b'{"inputs":[{"name":"%s","shape":[1,%d],"datatype":"FP32","parameters":{"binary_data_size":%d}}],'
            b'"parameters":{"binary_data_output":true}}' % (name.encode(), array.shape[1], array.nbytes)
        )
        body = header + array.astype(np.float32).tobytes()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            reader = sock.makefile("rb")
            for _ in range(3):
                sock.sendall(
                    b"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                    b"Inference-Header-Content-Length: %d\r\n\r\n" % (len(body), len(header)) + body
                )
                status = reader.readline()
                headers = {}
                while (line := reader.readline()) != b"\r\n":
                    key, _, value = line.decode().partition(":")
                    headers[key.strip().lower()] = value.strip()
                content = reader.read(int(headers["content-length"]))
                assert status.startswith(b"HTTP/1.1 200"), (status, content)
                split = int(headers["inference-header-content-length"])
                assert b'"binary_data_size":40' in content[:split]
                assert len(content) - split == 40  # 10 float32 scores
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert reader.readline().startswith(b"HTTP/1.1 200")

"""`onnxforge serve` with a host it cannot listen on (not an address, not this machine's, a port in use) is one
`error:` line before anything starts (was uvicorn's five log lines after the app's startup, exit 3)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.test_ops_hygiene import _cli, _one_error_line


@pytest.mark.parametrize(("env", "argv", "said"), [
    ({"ONNXFORGE_HOST": "999.1.1.1"}, [],
     "ONNXFORGE_HOST='999.1.1.1' is not an IP address nor a name that resolves here"),
    ({}, ["--host", "no-such-host.invalid"],
     "--host='no-such-host.invalid' is not an IP address nor a name that resolves here"),
    ({"ONNXFORGE_HOST": "192.0.2.1"}, [], "ONNXFORGE_HOST='192.0.2.1' is not an address of this machine"),  # TEST-NET-1
])
def test_a_host_serve_cannot_bind_is_one_error_line(env: dict[str, str], argv: list[str], said: str,
                                                    tmp_path: Path) -> None:
    _one_error_line(_cli(["serve", "--port", "0", "--no-worker", *argv], env, tmp_path), said)


def test_a_port_in_use_is_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _cli(["serve", "--no-worker"], {"ONNXFORGE_PORT": str(port)}, tmp_path)
    _one_error_line(done, f"ONNXFORGE_PORT={port}: the port is already in use on 127.0.0.1")

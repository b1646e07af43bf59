"""Upload validation runs in a child process (app/services/validation_child.py), not in the API process: a child that
is killed or runs past the time limit is a clear answer, the next upload works, and errors met in the child reach the
client with the class, status and words they had."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.errors import BadRequestError, StorageError
from app.services import validation_child
from optimizer.errors import InvalidModelError
from tests import models


def _heavy_model(mib: int = 32) -> onnx.ModelProto:
    """A MatMul chain with `mib` MiB of weights: its validation takes a while (parse, checker, session, inference)."""
    d = 1024
    layers = max(1, mib // 4)
    inits = [numpy_helper.from_array(np.full((d, d), 0.01 * (i + 1), np.float32), f"w{i}") for i in range(layers)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"],
                              ["y" if i == layers - 1 else f"h{i}"]) for i in range(layers)]
    graph = helper.make_graph(nodes, "heavy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _upload_while(api, kill: callable) -> object:  # noqa: ANN001 - conftest.Api
    """Upload the heavy model in a thread; call `kill()` once its validation child runs; the answer."""
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(api.upload(_heavy_model(), "heavy.onnx")))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not kill():
            assert thread.is_alive() and time.monotonic() < deadline, "the validation child never showed up"
            time.sleep(0.002)
    finally:
        thread.join(120)
    return answer[0]


def _server_pid() -> int | None:
    process = validation_child._server._process
    return process.pid if process is not None and process.poll() is None else None


def test_a_killed_validation_child_is_a_500_saying_so_and_the_next_upload_works(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(models.mlp(), "warm.onnx").status_code == 202  # the fork server is up
        server = _server_pid()
        assert server is not None and server != os.getpid()  # validation happens in another process

        niceness: list[int] = []

        def kill_child() -> bool:
            children = _children(server)
            for child in children:
                niceness.append(int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[16]))
                os.kill(child, signal.SIGKILL)
            return bool(children)

        refused = _upload_while(api, kill_child)
        assert refused.status_code == 500, refused.text
        error = refused.json()["error"]
        assert "was killed by signal SIGKILL" in error and "out-of-memory killer" in error, error
        assert niceness == [min(19, os.nice(0) + validation_child._NICE)]  # predicts of this replica go first
        assert _server_pid() == server  # the server lives on: only the upload's child died
        assert [m["name"] for m in api.client.get("/v1/models").json()] == ["warm"]  # nothing of it kept
        assert api.upload(models.mlp(), "next.onnx").status_code == 202


def test_a_killed_validation_server_fails_the_upload_it_ran_and_is_started_again(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(models.mlp(), "warm.onnx").status_code == 202
        server = _server_pid()
        assert server is not None

        def kill_server() -> bool:
            if not _children(server):
                return False
            os.kill(server, signal.SIGKILL)
            return True

        refused = _upload_while(api, kill_server)
        assert refused.status_code == 500, refused.text
        assert "was killed by signal SIGKILL" in refused.json()["error"], refused.text
        assert api.upload(models.mlp(), "next.onnx").status_code == 202
        assert _server_pid() not in (None, server)


def test_a_validation_past_the_time_limit_is_stopped_with_a_504(serve, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(validation_child, "VALIDATION_TIME_LIMIT_S", 0.0)
    with serve(run_worker=False) as api:
        refused = api.upload(_heavy_model(8), "slow.onnx")
        assert refused.status_code == 504, refused.text
        assert "longer than 0 s" in refused.json()["error"] and "stopped" in refused.json()["error"], refused.text
        assert api.client.get("/v1/models").json() == []
        assert _children(_server_pid()) == []  # the child was killed, not left running
        monkeypatch.setattr(validation_child, "VALIDATION_TIME_LIMIT_S", 60.0)
        assert api.upload(models.mlp(), "next.onnx").status_code == 202


def test_errors_met_in_the_child_keep_their_class_and_words(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(InvalidModelError, match="protobuf parse failed"):
        validation_child.run_checks({"model_path": str(broken), "calibration_path": None, "max_input_elements": None,
                                     "metrics": None})
    good = tmp_path / "good.onnx"
    onnx.save(models.mlp(), good)
    with pytest.raises(BadRequestError, match="metrics names outputs the model does not have: nope"):
        validation_child.run_checks({"model_path": str(good), "calibration_path": None, "max_input_elements": None,
                                     "metrics": {"nope": "cosine"}})
    # StorageError's own __init__ (message, errno) and a class the API cannot rebuild keep status and words
    rebuilt = validation_child._rebuild(validation_child._describe(StorageError("disk full while storing", 28)))
    assert isinstance(rebuilt, StorageError) and str(rebuilt) == "disk full while storing" and rebuilt.errno == 28
    bug = validation_child._rebuild(validation_child._describe(KeyError("x")))
    assert (bug.status_code, str(bug)) == (500, "internal error (KeyError); the server log has the details")

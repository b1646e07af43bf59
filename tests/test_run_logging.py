"""What a stopped or failed predict run leaves in the server's log: one line of ours, not ONNX Runtime's own."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from app.runtime.runs import RunTimeout, Watchdog
from tests import hostile, models


def _session(model) -> ort.InferenceSession:  # noqa: ANN001 - onnx.ModelProto
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_run_stopped_by_the_time_limit_leaves_no_onnx_runtime_error_line(capfd: pytest.CaptureFixture[str]) -> None:
    session = _session(hostile.model_that_hangs())
    feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape],
                             np.float32 if "float" in i.type else np.int64) for i in session.get_inputs()}
    capfd.readouterr()
    with pytest.raises(RunTimeout):
        Watchdog(0.3).run(session, None, feed)
    assert "terminate" not in capfd.readouterr().err.lower()


def test_a_run_that_fails_otherwise_is_logged_once_with_its_first_line(caplog: pytest.LogCaptureFixture) -> None:
    session = _session(models.mlp())
    bad = {"features": np.zeros((1, 63), np.float32)}  # 63 features where the weights expect 64
    with caplog.at_level(logging.WARNING, logger="app.runtime.runs"), pytest.raises(Exception) as raised:
        Watchdog(5.0).run(session, None, bad)
    assert not isinstance(raised.value, RunTimeout)
    lines = [r.getMessage() for r in caplog.records if r.name == "app.runtime.runs"]
    assert len(lines) == 1 and str(raised.value).strip().splitlines()[0] in lines[0]

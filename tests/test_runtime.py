"""Provider selection: CUDA only when it really works; what a session got is read back, not assumed."""

from __future__ import annotations

import pytest

from optimizer.runtime import (
    SessionSettings,
    create_session,
    cuda_is_usable,
    max_supported_ir_version,
    resolve_provider,
    session_provider,
)
from tests import models


def test_auto_picks_cuda_only_when_usable() -> None:
    assert resolve_provider("auto", cuda_usable=True) == "cuda"
    assert resolve_provider("auto", cuda_usable=False) == "cpu"


def test_cpu_request_never_touches_cuda() -> None:
    assert resolve_provider("cpu", cuda_usable=True) == "cpu"


def test_cuda_request_without_gpu_falls_back_to_cpu() -> None:
    assert resolve_provider("cuda", cuda_usable=False) == "cpu"


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        resolve_provider("tpu")


def test_cuda_listed_is_not_enough() -> None:
    """Without CUDA in the list the answer is no, without even trying a session."""
    assert cuda_is_usable(available=["CPUExecutionProvider"]) is False


# skipped only where CUDA really works: onnxruntime-gpu without a GPU is exactly the case this test is for
@pytest.mark.skipif(cuda_is_usable(), reason="CUDA really works on this machine")
def test_this_cpu_machine_serves_on_cpu() -> None:
    assert cuda_is_usable() is False
    assert resolve_provider("auto") == "cpu"


def test_session_reports_what_it_really_got() -> None:
    session = create_session(models.mlp().SerializeToString(), SessionSettings(provider=resolve_provider("auto")))
    assert session_provider(session) == resolve_provider("auto")
    outputs = session.run(None, models.random_feed(models.mlp()))
    assert outputs[0].shape == (2, 10)


def test_max_ir_version_is_probed() -> None:
    assert max_supported_ir_version() >= models.IR_VERSION

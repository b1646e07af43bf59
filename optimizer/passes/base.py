"""What every pass shares: its result type and the check that what it wrote loads and runs.

A pass is a module with a typed config dataclass and one function `run(model, config) -> PassResult`.
ONNX Runtime's tools sometimes raise or write invalid models; `verify_runs` turns both into a
PassError with the reason, so the pipeline can report a failed variant instead of crashing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from optimizer.errors import PassError, first_line
from optimizer.runtime import SessionSettings, create_session


@dataclass
class PassResult:
    """The model a pass produced and a JSON-ready record of what it changed."""

    model: onnx.ModelProto
    changes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def verify_runs(model: onnx.ModelProto, feed: dict[str, np.ndarray], pass_name: str) -> None:
    """Raise PassError unless the model passes the checker, loads in ONNX Runtime and runs on `feed`."""
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise PassError(f"{pass_name} wrote an invalid model: {exc}") from None
    try:
        session = create_session(model.SerializeToString(), SessionSettings(optimization_level="basic"))
        outputs = session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise PassError(f"{pass_name} wrote a model that ONNX Runtime cannot run: {first_line(exc)}") from None
    if not outputs:
        raise PassError(f"{pass_name} wrote a model with no outputs")

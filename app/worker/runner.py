"""The child process that runs one optimization (`optimizer.pipeline.optimize`) and reports back.

Started by the worker as `python -m app.worker.runner <fd>` with the job's RunSpec as JSON on stdin.
It writes JSON lines to file descriptor <fd>: ["progress", stage, fraction] while it runs, then
exactly one ["done", selected] or ["error", message]. Dying without a message (a crash in native
code, a kill) is for the worker to explain from the exit code.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunSpec:
    model_path: str
    out_dir: str
    calibration_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # optimizer.pipeline.OptimizeConfig fields

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def run(spec: RunSpec, send) -> None:  # noqa: ANN001 - Callable[[list], None]
    from optimizer.errors import OptimizerError
    from optimizer.pipeline import OptimizeConfig, optimize

    try:
        result = optimize(spec.model_path, out_dir=spec.out_dir, config=OptimizeConfig(**spec.config),
                          calibration=spec.calibration_path,
                          progress=lambda stage, fraction: send(["progress", str(stage), float(fraction)]))
        send(["done", result.selected])
    except OptimizerError as exc:
        send(["error", str(exc)])
    except Exception as exc:  # noqa: BLE001 - every failure must reach the job as a reason
        logging.getLogger("onnxforge.runner").error("optimizer failed:\n%s", traceback.format_exc())
        send(["error", f"the optimizer failed unexpectedly: {type(exc).__name__}: {exc}"])


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the worker to handle
    out = os.fdopen(int(sys.argv[1]), "wb", buffering=0)

    def send(message: list) -> None:
        out.write((json.dumps(message) + "\n").encode())

    spec = RunSpec(**json.loads(sys.stdin.read()))
    try:
        run(spec, send)
    finally:
        out.close()


if __name__ == "__main__":
    main()

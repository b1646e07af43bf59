"""The child process that runs one optimization (`optimizer.pipeline.optimize`) and reports back.

It talks to its worker through a pipe: ("progress", stage, fraction) while it runs, then exactly one
("done", selected) or ("error", message). Dying without a message (a crash in native code, a kill)
is for the worker to explain from the exit code.
"""

from __future__ import annotations

import logging
import signal
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from app.worker.lifeline import die_with_parent


@dataclass(frozen=True)
class RunSpec:
    model_path: str
    out_dir: str
    calibration_path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # optimizer.pipeline.OptimizeConfig fields


def run_in_child(spec: RunSpec, conn: Connection, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the worker to handle
    # Imported here, in the child: the worker process itself never loads the optimizer.
    from optimizer.errors import OptimizerError
    from optimizer.pipeline import OptimizeConfig, optimize

    def progress(stage: str, fraction: float) -> None:
        conn.send(("progress", str(stage), float(fraction)))

    try:
        result = optimize(spec.model_path, out_dir=spec.out_dir, config=OptimizeConfig(**spec.config),
                          calibration=spec.calibration_path, progress=progress)
        conn.send(("done", result.selected))
    except OptimizerError as exc:
        conn.send(("error", str(exc)))
    except Exception as exc:  # noqa: BLE001 - every failure must reach the job as a reason
        logging.getLogger(__name__).error("optimizer failed:\n%s", traceback.format_exc())
        conn.send(("error", f"the optimizer failed unexpectedly: {type(exc).__name__}: {exc}"))
    finally:
        conn.close()

"""The child process that runs one optimization (`optimizer.pipeline.optimize`) and reports back.

Started by the worker as `python -m app.worker.runner <fd> [<worker pid>]` with the job's RunSpec as JSON
on stdin; given the worker's pid, it first arranges to die with the worker (app/worker/lifeline.py).
It writes JSON lines to file descriptor <fd>: ["started"] once it is covered by the death signal (the
worker records its pid only then), ["progress", stage, fraction] while it runs, then
exactly one ["done", selected] or ["error", message], or ["error", message, "unrunnable"] when the failure
proves that the uploaded model itself cannot run (`cannot_run`: its version must not serve its original).
Dying without a message (a crash in native code, a kill) is for the worker to explain from the exit code.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
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
    memory_limit_mb: int = 0  # the child's address-space limit (settings.job_memory_limit_mb); 0 = none

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _out_of_memory(exc: BaseException) -> bool:
    """numpy raises MemoryError; ONNX Runtime's allocators raise their own errors naming bad_alloc."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "bad_alloc" in text or "failed to allocate" in text


def limit_memory(limit_mb: int) -> None:
    """Cap this process's address space, so a job that balloons fails here instead of starving the machine."""
    if limit_mb > 0:
        limit = limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def memory_message(limit_mb: int, with_samples: bool) -> str:
    """WHY two endings: without a calibration set the optimizer runs the model on a few generated inputs of its own
    shapes, so "send fewer samples" cannot help: the model itself needs more than the limit."""
    stopped = (f"the optimization needed more than {limit_mb / 1024:g} GiB of memory (ONNXFORGE_JOB_MEMORY_LIMIT_MB="
               f"{limit_mb}) and was stopped: ")
    if with_samples:
        return stopped + "raise the limit, or send fewer or smaller calibration samples"
    return stopped + ("no calibration samples were sent, so the model itself needs more memory than the job limit "
                      "(run on generated inputs of its own shapes): raise ONNXFORGE_JOB_MEMORY_LIMIT_MB, or upload the "
                      "model with smaller fixed input shapes")


def cannot_run(exc: BaseException) -> bool:
    """Whether `exc` proves that the uploaded model cannot run for any request: ONNX Runtime failed on generated
    inputs of the model's own declared shapes, none dynamic, so no client can send other shapes.

    WHY so narrow: generated inputs that do not suit a model with a dynamic dimension (too short for its padding),
    or calibration samples that fail, say nothing about the real requests its original serves today.
    """
    from optimizer.errors import ModelRunError

    return isinstance(exc, ModelRunError) and exc.generated and exc.fixed_shapes is not None


def run(spec: RunSpec, send) -> None:  # noqa: ANN001 - Callable[[list], None]
    from optimizer.errors import explain, first_line
    from optimizer.pipeline import OptimizeConfig, optimize
    from optimizer.quiet import route_ort_warnings

    route_ort_warnings()  # ORT's quantization advice, as "WARNING:root:" lines in the worker's log: debug level
    try:
        result = optimize(spec.model_path, out_dir=spec.out_dir, config=OptimizeConfig(**spec.config),
                          calibration=spec.calibration_path,
                          progress=lambda stage, fraction: send(["progress", str(stage), float(fraction)]))
        send(["done", result.selected])
    except Exception as exc:  # noqa: BLE001 - every failure must reach the job as a reason
        if spec.memory_limit_mb and _out_of_memory(exc):  # also when the optimizer wrapped ONNX Runtime's error
            send(["error", memory_message(spec.memory_limit_mb, spec.calibration_path is not None)])
            return
        explained = explain(exc, generated_inputs=spec.calibration_path is None, how_to_calibrate=(
            "upload calibration samples (real inputs: an .npz with one array per model input, "
            "-F calibration=@samples.npz) with the model again"))
        if explained is not None:
            send(["error", explained, *(["unrunnable"] if cannot_run(exc) else [])])
            return
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            send(["error", "the disk ran full while the optimizer wrote its output (No space left on device); "
                           "the serving version is unchanged: free space under ONNXFORGE_DATA_DIR and upload again"])
            return
        logging.getLogger("onnxforge.runner").error("optimizer failed:\n%s", traceback.format_exc())
        send(["error", f"the optimizer failed unexpectedly: {type(exc).__name__}: {first_line(exc)}"])


def main() -> None:
    if len(sys.argv) > 2:
        from app.worker.lifeline import die_with_parent

        die_with_parent(int(sys.argv[2]))  # first: a worker killed now must not leave this job running
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the worker to handle
    out = os.fdopen(int(sys.argv[1]), "wb", buffering=0)

    def send(message: list) -> None:
        out.write((json.dumps(message) + "\n").encode())

    send(["started"])
    spec = RunSpec(**json.loads(sys.stdin.read()))
    limit_memory(spec.memory_limit_mb)
    try:
        run(spec, send)
    finally:
        out.close()


if __name__ == "__main__":
    main()

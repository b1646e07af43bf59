"""Optimize one model end to end: validate, build each variant in isolation, evaluate, choose, report.

INTERIM: this first version only validates the model and serves it unchanged (variant "original");
the passes, accuracy check and benchmark are wired in as they land. The interface below is stable:
the service's worker and the `onnxforge optimize` command call `optimize` exactly like this.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.loading import LoadedModel, load_model
from optimizer.runtime import resolve_provider

#: Called with (stage, progress 0..1). Stages: validate, fuse, calibrate, quantize, evaluate, benchmark.
ProgressCallback = Callable[[str, float], None]

PRECISIONS = ("auto", "fp32", "fp16", "int8")
INT8_MODES = ("static", "dynamic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class OptimizeConfig:
    """What the user asked for. Defaults are what a user who says nothing should get."""

    precision: str = "auto"
    int8_mode: str | None = None  # None: static when a calibration set is given, else dynamic
    calibration_method: str = "minmax"
    provider: str = "auto"  # auto | cpu | cuda; resolved to what really serves
    threads: int = 0  # intra-op threads for benchmark sessions; 0 = ONNX Runtime's default (as serving)
    holdout_fraction: float = 0.2
    min_cosine: float = 0.99
    min_top1: float = 0.99
    time_budget_s: float = 300.0


@dataclass
class OptimizationResult:
    report: dict[str, Any]
    model_path: Path  # the selected variant, written to out_dir/model.onnx
    selected: str


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def optimize(
    model: LoadedModel | str | Path | bytes,
    *,
    out_dir: str | Path,
    config: OptimizeConfig | None = None,
    calibration: str | Path | bytes | None = None,
    progress: ProgressCallback | None = None,
) -> OptimizationResult:
    """Write out_dir/model.onnx (the variant to serve) and out_dir/report.json; return the report.

    Raises OptimizerError for a bad model or calibration set. A pass that fails becomes a failed
    variant in the report, never an exception.
    """
    config = config or OptimizeConfig()
    notify = progress or (lambda stage, fraction: None)
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    notify("validate", 0.0)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    provider = resolve_provider(config.provider)
    model_path = out / "model.onnx"
    _atomic_write(model_path, loaded.to_bytes())
    report: dict[str, Any] = {
        "source": {"sha256": loaded.sha256, "size_bytes": loaded.size_bytes, "ir_version": loaded.ir_version,
                   "original_ir_version": loaded.original_ir_version, "notes": loaded.notes},
        "provider": provider,
        "config": config.__dict__,
        "variants": [],
        "baseline": "original",
        "selected": "original",
        "speedup_p50": 1.0,
        "size_ratio": 1.0,
        "duration_s": round(time.perf_counter() - started, 3),
    }
    _atomic_write(out / "report.json", json.dumps(report, indent=2).encode())
    notify("benchmark", 1.0)
    return OptimizationResult(report=report, model_path=model_path, selected="original")

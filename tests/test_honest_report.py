"""report.json is written for a config of numpy numbers (review-lib F2), says what it was measured with (F8), and
states the served speed-up as its lower bound (F3). A real optimization of a small model on ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from optimizer.candidates import cpu_flags
from optimizer.pipeline import OptimizeConfig, optimize
from tests import models


def numpy_config() -> OptimizeConfig:
    """What a notebook passes: thresholds and counts computed with numpy."""
    return OptimizeConfig(precision="fp32", min_cosine=np.float32(0.98), min_top1=np.float64(0.7),
                          threads=np.int64(1), batch_sizes=np.array([1, 4]), time_budget_s=np.float32(60),
                          benchmark_seconds=np.float32(0.2), holdout_fraction=np.float32(0.25))


def test_validate_turns_numpy_numbers_into_python_numbers() -> None:
    config = numpy_config()
    config.validate()
    assert type(config.threads) is int and config.threads == 1
    assert config.batch_sizes == (1, 4) and all(type(b) is int for b in config.batch_sizes)
    for name in ("min_cosine", "min_top1", "time_budget_s", "benchmark_seconds", "holdout_fraction"):
        assert type(getattr(config, name)) is float, name
    assert config.min_cosine == pytest.approx(0.98) and config.holdout_fraction == 0.25
    json.dumps(config.__dict__)


@pytest.mark.parametrize("field, value", [("threads", np.float32(1.5)), ("batch_sizes", (np.float64(1.0),)),
                                          ("min_cosine", np.float32(1.5))])
def test_numpy_values_that_cannot_work_are_still_refused(field: str, value: object) -> None:
    from optimizer.errors import OptimizerError

    with pytest.raises(OptimizerError, match=field):
        OptimizeConfig(**{field: value}).validate()


def test_a_numpy_config_writes_report_json_with_versions_and_the_cpu(tmp_path: Path) -> None:
    result = optimize(models.mlp().SerializeToString(), out_dir=tmp_path, config=numpy_config())
    written = json.loads((tmp_path / "report.json").read_text())
    assert written == json.loads(json.dumps(result.report))
    assert written["config"]["threads"] == 1 and written["config"]["batch_sizes"] == [1, 4]
    env = written["environment"]
    assert env["onnxruntime"] == ort.__version__ and env["onnx"] == onnx.__version__
    assert env["onnxforge"] is None or env["onnxforge"].count(".") >= 1
    assert env["execution_provider"] == "CPUExecutionProvider" and written["provider"] == "cpu"
    assert set(env["cpu"]["flags"]) <= cpu_flags() and env["cpu"]["vnni"] in (True, False)
    assert env["cpu"]["model"] is None or env["cpu"]["model"].strip()
    if written["selected"] == written["baseline"]:
        assert written["speedup_served"] == 1.0
    else:
        assert written["speedup_served"] == pytest.approx(written["speedup_paired"]["low"], abs=1e-3)

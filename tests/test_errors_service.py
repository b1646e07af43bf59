"""A model that loads but cannot run, at the service (a user review, finding 6): its job says what is true, one
mapping with the library's (optimizer.errors). Real app and worker, real ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import onnx

from app.worker.runner import RunSpec, run
from tests.test_errors_library import broken_conv, impossible_reshape


def test_a_model_failing_on_its_own_fixed_shapes_fails_its_job_without_calibration_advice(serve) -> None:  # noqa: ANN001
    """Before: the job said "generated inputs ... did not suit this model: upload calibration samples", though with no
    dynamic dimension the generated inputs have the model's own declared shapes."""
    with serve() as api:
        answer = api.upload(broken_conv(), name="broken")
        assert answer.status_code == 202, answer.text  # it loads: only running it shows the problem
        job = api.wait(answer.json()["job_id"])
        assert job["status"] == "failed", job
        error = job["error"]
        assert error.startswith("the model fails on inputs of its own declared shapes (x [1, 3, 8, 8]): Fail: "), error
        assert "C: 3 kernel channels: 5" in error and "the model itself is broken" in error
        assert "calibration" not in error and "onnxruntime_src" not in error and "\n" not in error


def test_the_worker_job_says_the_same_as_the_library(tmp_path: Path) -> None:
    """The runner's message is the library's mapping with the service's way of sending real inputs."""
    said = {}
    for name, model in (("fixed", broken_conv()), ("dynamic", impossible_reshape())):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        messages: list[list] = []
        run(RunSpec(str(path), str(tmp_path / name), config={"precision": "fp32", "time_budget_s": 10.0,
                                                               "threads": 1}), messages.append)
        assert messages[-1][0] == "error", messages
        said[name] = messages[-1][1]
    assert said["fixed"].startswith("the model fails on inputs of its own declared shapes (x [1, 3, 8, 8]): "), said
    assert "calibration" not in said["fixed"]
    assert said["dynamic"].startswith("ONNX Runtime could not run the model on the inputs the optimizer generated")
    assert said["dynamic"].endswith("upload calibration samples (real inputs: an .npz with one array per model "
                                    "input, -F calibration=@samples.npz) with the model again"), said["dynamic"]

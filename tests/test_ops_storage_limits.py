"""A full or read-only disk and over-limit models get clear answers, not 500s (ops review findings #3, #5).

The disks are real: a small tmpfs mounted for the test, filled, or remounted read-only (needs root and `mount`, as
CI runs; skipped with the reason otherwise). The database lives elsewhere, as in any real deployment.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.errors import BadRequestError
from app.services.uploads import ValidationLimiter, validate_upload
from app.worker.runner import RunSpec
from tests import hostile, models
from tests.conftest import Api, files_under, npz
from tests.test_hardening_faults import fill_disk

Mount = Callable[[Path, str], None]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    """`mount(folder, size)`: a tmpfs of `size` (e.g. "4m") on `folder`, unmounted after the test."""
    mounted: list[Path] = []

    def make(folder: Path, size: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill or make read-only (needs root): {result.stderr.strip()}")
        mounted.append(folder)

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True, capture_output=True)


@contextmanager
def _serving_v1(serve, tmp_path: Path, data_dir: Path) -> Iterator[Api]:  # noqa: ANN001 - the conftest fixture
    """The app on `data_dir` (no worker: nothing else writes), with models.mlp() stored as `m` version 1."""
    with serve(data_dir=data_dir, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", run_worker=False) as api:
        assert api.upload(models.mlp(), name="m").status_code == 202
        yield api


def _assert_only_v1(api: Api) -> None:
    """The refused upload left nothing: `m` has version 1 only, its file alone in the store, no spooled upload,
    and it still predicts."""
    listed = api.client.get("/v1/models/m").json()
    assert [v["version"] for v in listed["versions"]] == [1], listed
    settings = api.services.settings
    assert files_under(settings.artifacts_dir) - {"filler"} == {"models/m/1/original.onnx"}
    assert not list(settings.uploads_dir.iterdir()), "a refused upload left a temporary file behind"
    assert api.predict("m", models.random_feed(models.mlp(), batch=2)).status_code == 200


def _storage_log(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# Where the disk fills: the whole data folder (the upload cannot even be received), or only the artifact store on its
# own volume (the upload is received, then storing it fails after the version row was written: rolled back).
@pytest.mark.parametrize("full", ["data folder", "artifact store"])
def test_an_upload_to_a_full_disk_is_a_507_that_keeps_nothing(serve, mount: Mount, tmp_path: Path,  # noqa: ANN001
                                                              caplog: pytest.LogCaptureFixture, full: str) -> None:
    data_dir = tmp_path / "data"
    disk = data_dir if full == "data folder" else data_dir / "artifacts"
    mount(disk, "4m")
    with _serving_v1(serve, tmp_path, data_dir) as api:
        filler = fill_disk(disk)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            samples = npz(features=np.ones((8, 64), "f4"))
            response = api.upload(models.mlp(hidden=512, seed=2), name="m", calibration=samples)
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert "the server's disk is full" in error and "No space left on device" in error, error
        logged = _storage_log(caplog)
        assert len(logged) == 1 and logged[0].exc_info is None, [(r.getMessage(), r.exc_info) for r in logged]
        _assert_only_v1(api)

        ready = api.client.get("/readyz")  # predict still works: a warning, not a 503
        assert ready.status_code == 200, ready.text
        assert ready.json()["storage"] == "low" and ready.json()["storage_free_bytes"] == 0, ready.json()
        assert "ONNXFORGE_MAX_MODEL_BYTES" in ready.json()["storage_warning"]

        filler.unlink()
        assert api.upload(models.mlp(seed=3), name="m").status_code == 202
        assert api.client.get("/readyz").json()["storage_free_bytes"] > 0


def test_readyz_reports_free_space_and_warns_below_the_largest_model(serve, tmp_path: Path) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        ready = api.client.get("/readyz").json()
        assert ready["storage"] == "ok" and ready["storage_free_bytes"] > 0 and "storage_warning" not in ready
    with serve(run_worker=False, max_model_bytes=1 << 60) as api:  # more than any disk here has free
        ready = api.client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["storage"] == "low", ready


def test_a_read_only_store_refuses_uploads_and_deletes_in_words(serve, mount: Mount, tmp_path: Path,  # noqa: ANN001
                                                                caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    mount(data_dir, "8m")
    with _serving_v1(serve, tmp_path, data_dir) as api:
        _remount(data_dir, "ro")
        try:
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                response = api.upload(models.mlp(seed=2), name="m")
            assert response.status_code == 507, response.text
            assert "not writable" in response.json()["error"], response.text
            assert "Read-only file system" in response.json()["error"], response.text
            assert [r.exc_info for r in _storage_log(caplog)] == [None]

            # The delete cannot remove the files: it must not answer 200 as if it had.
            deleted = api.client.delete("/v1/models/m")
            assert deleted.status_code == 507, deleted.text
            error = deleted.json()["error"]
            assert "models/m/1" in error and "could not be removed" in error and "1 file(s) stayed" in error, error
            assert (api.services.settings.artifacts_dir / "models/m/1/original.onnx").is_file()
            assert api.client.get("/v1/models/m").status_code == 404  # the version itself is deleted, as it says
        finally:
            _remount(data_dir, "rw")


def _fixed_input_model(shape: list[int | str]) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 13)])


def _validate(tmp_path: Path, model: onnx.ModelProto, limit: int) -> None:
    path = tmp_path / "big.onnx"
    onnx.save(model, path)
    validate_upload(path, "big.onnx", None, {}, ValidationLimiter(1, 1.0), max_input_elements=limit)


def test_a_model_whose_fixed_input_exceeds_max_input_elements_is_refused_at_upload(tmp_path: Path) -> None:
    limit = 1 << 24
    with pytest.raises(BadRequestError) as refused:
        _validate(tmp_path, _fixed_input_model([1, 4097, 4096]), limit)
    message = str(refused.value)
    assert "'x'" in message and "16781312 elements" in message and "ONNXFORGE_MAX_INPUT_ELEMENTS" in message, message
    with pytest.raises(BadRequestError, match="at least 16781312 elements"):  # its fixed dimensions alone
        _validate(tmp_path, _fixed_input_model(["batch", 4097, 4096]), limit)
    _validate(tmp_path, _fixed_input_model([1, 4096, 4096]), limit)  # exactly the limit: predict takes it
    _validate(tmp_path, _fixed_input_model(["batch", 4096]), limit)


def _run_child(tmp_path: Path, spec: RunSpec) -> list[list]:
    """Run the optimizer child as the worker does; its messages."""
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen([sys.executable, "-m", "app.worker.runner", str(write_fd)], stdin=subprocess.PIPE,
                             pass_fds=(write_fd,), cwd=Path(__file__).resolve().parents[1])
    os.close(write_fd)
    child.communicate(spec.to_json().encode(), timeout=300)
    with os.fdopen(read_fd, "rb") as pipe:
        return [json.loads(line) for line in pipe.read().splitlines() if line.strip()]


def test_out_of_memory_without_samples_does_not_ask_for_fewer_samples(tmp_path: Path) -> None:
    model = tmp_path / "hog.onnx"
    onnx.save(hostile.model_memory_hog(400_000_000), model)
    config = {"precision": "fp32", "provider": "cpu", "threads": 1, "time_budget_s": 30.0}
    without = _run_child(tmp_path, RunSpec(str(model), str(tmp_path / "a"), None, config, memory_limit_mb=1024))
    error = without[-1]
    assert error[0] == "error" and "needed more than 1 GiB of memory" in error[1], without
    assert "calibration samples" not in error[1].replace("no calibration samples were sent", ""), error[1]
    assert "the model itself needs more memory" in error[1] and "ONNXFORGE_JOB_MEMORY_LIMIT_MB" in error[1]

    samples = tmp_path / "samples.npz"
    samples.write_bytes(npz(x=np.ones((8, 1, 1), "f4")))
    sent = _run_child(tmp_path, RunSpec(str(model), str(tmp_path / "b"), str(samples), config, memory_limit_mb=1024))
    assert "send fewer or smaller calibration samples" in sent[-1][1], sent

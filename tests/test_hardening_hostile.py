"""The corpus of hostile uploads (tests/hostile.py): each gets a 4xx or a failed job with a reason,
nothing is left behind, and the service keeps serving the model it already had.

Complements tests/test_app_upload.py (empty file, text, zip-for-onnx, over-size, bad fields) with
inputs built to attack: external data outside the upload, cycles, absurd sizes, pickles, bombs,
and models that exhaust memory or never finish running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest

from tests import hostile, models
from tests.conftest import Api, assert_only_good_serves, post_bad, serving_good_model


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with serving_good_model(tmp_path_factory.mktemp("hostile")) as api:
        yield api


def _mlp() -> bytes:
    return models.mlp().SerializeToString()


# name: (model bytes, calibration bytes or None, status, fragment of the error)
UPLOADS: dict[str, tuple[Callable[[], bytes], Callable[[], bytes] | None, int, str]] = {
    "random bytes (no ONNX magic)": (lambda: hostile.random_bytes(4096, seed=7), None, 400, "not a valid ONNX"),
    "truncated protobuf": (hostile.truncated_model, None, 400, "truncated"),
    "external data at /etc/passwd": (lambda: hostile.model_external_data("/etc/passwd"), None, 400,
                                     "only relative paths"),
    "external data at ../..": (lambda: hostile.model_external_data("../../../../etc/passwd"), None, 400,
                               "outside the model's folder"),
    "graph with a cycle": (hostile.model_with_cycle, None, 400, "topologically sorted"),
    "initializer declaring 1e12 elements": (hostile.model_absurd_initializer, None, 400, "too small for the declared"),
    "custom-domain op": (hostile.model_custom_op, None, 400, "com.evil:Frobnicate"),
    "npz declaring 1e12 x 64 floats": (_mlp, hostile.npz_declared_huge, 400, "declares more than"),
    "pickle inside the npz": (_mlp, hostile.npz_with_pickle, 400, "pickle"),
    "npz member named ../../": (_mlp, hostile.npz_with_traversal, 400, "match no model input"),
}


@pytest.mark.parametrize("case", list(UPLOADS))
def test_hostile_upload_is_refused_and_changes_nothing(api: Api, case: str) -> None:
    model, calibration, status, fragment = UPLOADS[case]
    response = post_bad(api, model(), calibration() if calibration else None)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    assert_only_good_serves(api)


def test_pickle_payload_never_runs(api: Api, tmp_path: Path) -> None:
    """A pickle whose loading would create a file: refused, and the file never appears."""
    import io
    import pickle

    import numpy as np

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # noqa: ANN204 - pickle protocol
            return (Path.touch, (marker,))

    values = np.empty(1, dtype=object)
    values[0] = Payload()
    buffer = io.BytesIO()
    np.savez(buffer, features=values)
    assert pickle.dumps(Payload())  # the payload really is a pickle that would run
    response = post_bad(api, _mlp(), buffer.getvalue())
    assert response.status_code == 400 and "pickle" in response.json()["error"]
    assert not marker.exists()
    assert_only_good_serves(api)


def test_models_that_exhaust_memory_or_never_finish_fail_their_jobs(serve) -> None:  # noqa: ANN001
    """Valid files whose run is the attack: each job fails with its reason; the good model serves throughout."""
    # Two runs of the service on one data folder: a time limit applies to every job, and the good MLP's jobs (fuse,
    # auto, timing) had to fit in it on a loaded 2-core machine (4 s failed there twice in the fuse stage, and 10 s
    # is no bound either). So the memory attacks run without one, and the hanging model alone under a short one.
    feed = models.random_feed(models.mlp(), batch=2)
    with serve(job_memory_limit_mb=1024) as api:
        good = api.upload(models.mlp(), name="good", precision="fp32").json()["job_id"]
        assert api.wait(good)["status"] == "succeeded"
        expected = api.predict("good", feed).json()["outputs"]
        worker_pid = api.services.worker.pid
        # an input no predict could send (over ONNXFORGE_MAX_INPUT_ELEMENTS) is refused at upload, no job runs
        refused = api.upload(hostile.model_absurd_input_dims(), name="absurd-dims")
        assert refused.status_code == 400 and "ONNXFORGE_MAX_INPUT_ELEMENTS" in refused.json()["error"], refused.text
        _fails_with(api, "memory-hog", hostile.model_memory_hog(400_000_000), "needed more than 1 GiB of memory",
                    feed, expected)
        assert api.services.worker.pid == worker_pid  # the runner child died, never the worker
        again = api.upload(models.mlp(seed=5), name="after", precision="fp32").json()["job_id"]
        assert api.wait(again)["status"] == "succeeded"
    with serve(job_memory_limit_mb=1024, job_time_limit_s=2) as api:
        worker_pid = api.services.worker.pid
        _fails_with(api, "hangs", hostile.model_that_hangs(), "exceeded the job time limit of 2 s", feed, expected)
        assert api.services.worker.pid == worker_pid and api.services.worker.alive()


def _fails_with(api: Api, name: str, model: onnx.ModelProto, reason: str, feed: dict, expected: dict) -> None:
    response = api.upload(model, name=name)
    assert response.status_code == 202, response.text  # it loads: only running it shows the problem
    job = api.wait(response.json()["job_id"])
    assert job["status"] == "failed", (name, job)
    assert reason in job["error"], (name, job["error"])
    # its original still serves (as while the job ran), never an optimized variant
    refused = api.predict(name, {"x": [[1.0]]}, variant="optimized")
    assert refused.status_code == 409 and "optimization failed" in refused.json()["error"], refused.text
    assert api.predict("good", feed).json()["outputs"] == expected


@pytest.mark.slow
def test_real_zip_bomb_is_refused_before_inflating(api: Api) -> None:
    """~10 MB sent that inflates to 2.25 GiB: refused from the array header, not by inflating it."""
    response = post_bad(api, _mlp(), hostile.npz_zip_bomb())
    assert response.status_code == 400, response.text
    assert "declares more than" in response.json()["error"]
    assert_only_good_serves(api)

"""Uploads: validated before the 202; every bad upload gets its documented 4xx and changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from tests import models
from tests.conftest import Api, assert_only_good_serves, npz, post_bad, serving_good_model

LIMIT = 400_000  # bytes, for the model and for the calibration set


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with serving_good_model(tmp_path_factory.mktemp("data"), max_model_bytes=LIMIT,
                            max_calibration_bytes=LIMIT) as api:
        yield api


def _mlp_bytes() -> bytes:
    return models.mlp().SerializeToString()


def _broken_graph() -> bytes:
    model = models.mlp()
    model.graph.node[0].input[0] = "no_such_tensor"
    return model.SerializeToString()


def _unknown_op() -> bytes:
    model = models.mlp()
    model.graph.node[2].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model.SerializeToString()


def _samples(**arrays: np.ndarray) -> bytes:
    return npz(**arrays)


rng = np.random.default_rng(0)
CASES: dict[str, tuple[Callable[[Api], Any], int, str]] = {
    "empty file": (lambda api: post_bad(api, b""), 400, "empty"),
    "random bytes": (lambda api: post_bad(api, b"\x08\x07" + rng.bytes(3000)), 400, "ONNX"),
    "truncated model": (lambda api: post_bad(api, _mlp_bytes()[: len(_mlp_bytes()) // 2]), 400, "ONNX"),
    "checker refuses": (lambda api: post_bad(api, _broken_graph()), 400, "checker"),
    "op ONNX Runtime lacks": (lambda api: post_bad(api, _unknown_op()), 400, "ONNX Runtime cannot load"),
    "zip instead of ONNX": (lambda api: post_bad(api, _samples(features=np.zeros((2, 64), np.float32))), 415, "ZIP"),
    "text instead of ONNX": (lambda api: post_bad(api, b"name: resnet\nlayers: 50\n"), 415, "text"),
    "calibration names": (
        lambda api: post_bad(api, _mlp_bytes(), _samples(pixels=np.zeros((8, 64), np.float32))), 400, "'features'"),
    "calibration shapes": (
        lambda api: post_bad(api, _mlp_bytes(), _samples(features=np.zeros((8, 63), np.float32))), 400, "64"),
    "calibration dtype": (
        lambda api: post_bad(api, _mlp_bytes(), _samples(features=np.zeros((8, 64), np.int64))), 400, "float32"),
    "calibration not npz": (lambda api: post_bad(api, _mlp_bytes(), _mlp_bytes()), 415, ".npz"),
    "model over the limit (declared length)": (
        lambda api: post_bad(api, models.mlp(hidden=512).SerializeToString()), 413, "larger than the limits"),
    "model over the limit (streamed)": (
        lambda api: post_bad(api, models.mlp(hidden=360).SerializeToString()), 413, "ONNXFORGE_MAX_MODEL_BYTES"),
    "calibration over the limit": (
        lambda api: post_bad(api, _mlp_bytes(), _samples(features=np.zeros((1700, 64), np.float32))), 413,
        "ONNXFORGE_MAX_CALIBRATION_BYTES"),
    "not multipart": (lambda api: api.client.post("/v1/models", json={"file": "model.onnx"}), 415, "multipart"),
    "no file field": (lambda api: api.client.post("/v1/models", files={"name": (None, "x")}), 422, "`file`"),
    "unknown field": (lambda api: post_bad(api, _mlp_bytes(), colour="blue"), 400, "unknown form field 'colour'"),
    "bad precision": (lambda api: post_bad(api, _mlp_bytes(), precision="int4"), 400, "precision must be one of"),
    "bad name": (lambda api: post_bad(api, _mlp_bytes(), name="../etc"), 400, "invalid model name"),
    "static INT8 without samples": (lambda api: post_bad(api, _mlp_bytes(), int8_mode="static"), 400, "calibration"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_gets_its_status_and_changes_nothing(api: Api, case: str) -> None:
    send, status, fragment = CASES[case]
    response = send(api)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    assert fragment in response.json()["error"]
    assert_only_good_serves(api)


def test_upload_answers_202_with_a_job_and_describes_the_model(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        model = models.transformer()
        response = api.upload(model, "My Encoder.onnx")
        assert response.status_code == 202, response.text
        body = response.json()
        assert (body["name"], body["version"]) == ("My-Encoder", 1)
        assert body["status_url"] == f"/v1/jobs/{body['job_id']}" == response.headers["location"]
        job = api.client.get(body["status_url"]).json()
        assert (job["status"], job["model"], job["version"], job["progress"]) == ("queued", "My-Encoder", 1, 0.0)

        described = api.client.get("/v1/models/My-Encoder").json()
        assert (described["serving_version"], described["serving_variant"]) == (1, "original")
        assert described["provider"] == "cpu"
        assert described["inputs"] == [
            {"name": "hidden_states", "dtype": "float32", "shape": ["batch", "seq", 64]},
            {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
        ]
        assert described["versions"][0]["status"] == "optimizing"
        assert described["versions"][0]["job"]["id"] == body["job_id"]
        stored = api.services.settings.artifacts_dir / "models/My-Encoder/1/original.onnx"
        assert onnx.load(stored).graph.input[0].name == "hidden_states"


def test_versions_count_up_and_are_never_reused(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(models.mlp(seed=1), name="m").json()["version"] == 1
        assert api.upload(models.mlp(seed=2), name="m").json()["version"] == 2
        assert api.client.delete("/v1/models/m/versions/2").status_code == 200
        assert api.upload(models.mlp(seed=3), name="m").json()["version"] == 3
        versions = [v["version"] for v in api.client.get("/v1/models/m").json()["versions"]]
        assert versions == [1, 3]
        assert api.client.delete("/v1/models/m").json() == {"deleted": "m", "versions": 2}
        assert api.client.get("/v1/models/m").status_code == 404
        assert not (api.services.settings.artifacts_dir / "models/m/1").exists()
        assert api.upload(models.mlp(seed=4), name="m").json()["version"] == 4

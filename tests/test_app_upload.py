"""Uploads: validated before the 202; every bad upload gets its documented 4xx and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import helper

from app.main import create_app
from app.settings import Settings
from tests import models
from tests.conftest import TEST_SETTINGS, Api, npz

LIMIT = 400_000  # bytes, for the model and for the calibration set


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Api:
    """One app (no worker: jobs stay queued) holding one good model, `good` version 1."""
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path_factory.mktemp("data"), "run_worker": False,
                           "max_model_bytes": LIMIT, "max_calibration_bytes": LIMIT})
    with TestClient(create_app(settings)) as client:
        api = Api(client)
        assert api.upload(models.mlp(), "good.onnx").status_code == 202
        yield api


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _assert_untouched(api: Api) -> None:
    listed = api.client.get("/v1/models").json()
    assert [(m["name"], m["versions"], m["latest_version"]) for m in listed] == [("good", 1, 1)]
    settings = api.services.settings
    assert _files(settings.artifacts_dir) == {"models/good/1/original.onnx"}
    assert not list(settings.uploads_dir.iterdir()), "an upload left a temporary file behind"
    feed = models.random_feed(models.mlp(), batch=1)
    assert api.predict("good", feed).status_code == 200


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


def _post(api: Api, model: bytes, calibration: bytes | None = None, **fields: str):  # noqa: ANN202
    return api.upload(model, "bad.onnx", calibration, **fields)


rng = np.random.default_rng(0)
CASES: dict[str, tuple[Callable[[Api], Any], int, str]] = {
    "empty file": (lambda api: _post(api, b""), 400, "empty"),
    "random bytes": (lambda api: _post(api, b"\x08\x07" + rng.bytes(3000)), 400, "ONNX"),
    "truncated model": (lambda api: _post(api, _mlp_bytes()[: len(_mlp_bytes()) // 2]), 400, "ONNX"),
    "checker refuses": (lambda api: _post(api, _broken_graph()), 400, "checker"),
    "op ONNX Runtime lacks": (lambda api: _post(api, _unknown_op()), 400, "ONNX Runtime cannot load"),
    "zip instead of ONNX": (lambda api: _post(api, _samples(features=np.zeros((2, 64), np.float32))), 415, "ZIP"),
    "text instead of ONNX": (lambda api: _post(api, b"name: resnet\nlayers: 50\n"), 415, "text"),
    "calibration names": (
        lambda api: _post(api, _mlp_bytes(), _samples(pixels=np.zeros((8, 64), np.float32))), 400, "'features'"),
    "calibration shapes": (
        lambda api: _post(api, _mlp_bytes(), _samples(features=np.zeros((8, 63), np.float32))), 400, "64"),
    "calibration dtype": (
        lambda api: _post(api, _mlp_bytes(), _samples(features=np.zeros((8, 64), np.int64))), 400, "float32"),
    "calibration not npz": (lambda api: _post(api, _mlp_bytes(), _mlp_bytes()), 415, ".npz"),
    "model over the limit (declared length)": (
        lambda api: _post(api, models.mlp(hidden=512).SerializeToString()), 413, "larger than the limits"),
    "model over the limit (streamed)": (
        lambda api: _post(api, models.mlp(hidden=360).SerializeToString()), 413, "ONNXFORGE_MAX_MODEL_BYTES"),
    "calibration over the limit": (
        lambda api: _post(api, _mlp_bytes(), _samples(features=np.zeros((1700, 64), np.float32))), 413,
        "ONNXFORGE_MAX_CALIBRATION_BYTES"),
    "not multipart": (lambda api: api.client.post("/v1/models", json={"file": "model.onnx"}), 415, "multipart"),
    "no file field": (lambda api: api.client.post("/v1/models", files={"name": (None, "x")}), 422, "`file`"),
    "unknown field": (lambda api: _post(api, _mlp_bytes(), colour="blue"), 400, "unknown form field 'colour'"),
    "bad precision": (lambda api: _post(api, _mlp_bytes(), precision="int4"), 400, "precision must be one of"),
    "bad name": (lambda api: _post(api, _mlp_bytes(), name="../etc"), 400, "invalid model name"),
    "static INT8 without samples": (lambda api: _post(api, _mlp_bytes(), int8_mode="static"), 400, "calibration"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upload_gets_its_status_and_changes_nothing(api: Api, case: str) -> None:
    send, status, fragment = CASES[case]
    response = send(api)
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    assert fragment in response.json()["error"]
    _assert_untouched(api)


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

"""Defects found reviewing the session's changes (H7), each pinned by a test that failed before its fix."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from optimizer import UnsupportedModelError
from optimizer.pipeline import OptimizeConfig, optimize
from tests import models
from tests.conftest import TEST_SETTINGS


def test_size_ratio_of_a_model_with_external_data_counts_its_weights(tmp_path: Path) -> None:
    """The original's size is what the user has: the .onnx file and its external data file. Counting the
    .onnx alone (866 bytes for this MLP's 1.6 MB) put the fused copy at ~1800x the original."""
    model = models.mlp(features=256, hidden=512)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    on_disk = (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    report = optimize(tmp_path / "m.onnx", out_dir=tmp_path / "out",
                      config=OptimizeConfig(precision="fp32", benchmark_seconds=0.2, batch_sizes=(1,))).report
    sizes = {v["name"]: v["size_bytes"] for v in report["variants"]}
    assert abs(sizes["original"] - on_disk) <= 0.01 * on_disk
    assert 0.9 < sizes["fused"] / sizes["original"] < 1.1


def test_a_model_with_a_non_tensor_output_is_refused_naming_it(tmp_path: Path) -> None:
    """Was: the upload accepted (202), every predict a 500 (orjson: 'Dict key must be str'; /v2: a list has no
    dtype) and the job failed inside the accuracy check (AttributeError), so the model never served."""
    model = models.zipmap_classifier()
    with pytest.raises(UnsupportedModelError, match="'probabilities'.*zipmap"):
        optimize(model.SerializeToString(), out_dir=tmp_path / "out", config=OptimizeConfig(precision="fp32"))
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "app", "run_worker": False})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/models", files={"file": ("clf.onnx", model.SerializeToString())},
                               data={"name": "clf"})
        assert response.status_code == 400
        assert "'probabilities'" in response.json()["error"]
        assert client.get("/v1/models/clf").status_code == 404

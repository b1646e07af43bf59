"""The `onnxforge` command on files: optimize writes model + report, inspect and bench print, errors exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from app.cli import main
from tests import models


@pytest.fixture
def cnn_files(tmp_path: Path) -> tuple[Path, Path]:
    model = models.cnn()
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(12)]
    npz = tmp_path / "samples.npz"
    np.savez(npz, image=np.stack([f["image"] for f in feeds]))
    return path, npz


def test_optimize_writes_model_and_report(cnn_files: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, npz = cnn_files
    out = tmp_path / "out"
    code = main(["optimize", str(model), "--out", str(out), "--calibration", str(npz), "--precision", "int8",
                 "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert onnx.load(out / "model.onnx").graph.output[0].name == "logits"
    printed = capsys.readouterr().out
    assert "selected:" in printed
    for variant in report["variants"]:
        assert variant["name"] in printed
    assert report["calibration"]["samples"] + report["calibration"]["holdout_samples"] == 12


def test_optimize_refuses_garbage_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage" * 50)
    assert main(["optimize", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "not a valid ONNX model" in capsys.readouterr().err
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_inspect_prints_findings_and_json(cnn_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = cnn_files
    assert main(["inspect", str(model)]) == 0
    assert "Conv+BatchNormalization x2" in capsys.readouterr().out
    assert main(["inspect", str(model), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["node_count"] == 9
    assert report["op_histogram"]["Conv"] == 2


def test_bench_times_models_side_by_side(cnn_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, npz = cnn_files
    copy = model.with_name("copy.onnx")
    copy.write_bytes(model.read_bytes())
    assert main(["bench", str(model), str(copy), "--inputs", str(npz), "--seconds", "0.1", "--batch", "1", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.endswith("x") and ".onnx" in line]
    assert [(r[0].rsplit("/", 1)[-1], r[1]) for r in rows] == [("cnn.onnx", "1"), ("copy.onnx", "1"),
                                                               ("cnn.onnx", "4"), ("copy.onnx", "4")]
    assert all(float(r[-1].rstrip("x")) > 0 for r in rows)

"""`onnxforge optimize` on models that fail, and when nothing beats the original (a user review, findings 8 and 9):
one `error:` line and nothing of ONNX Runtime's own log before it; the kept original written as the input's bytes,
as the service serves the uploaded file. Real CLI (a subprocess where stderr's file descriptor matters)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from app.cli import main
from tests import models
from tests.test_errors_library import _relu, broken_conv

ROOT = Path(__file__).resolve().parents[1]


def test_a_model_broken_on_its_own_shapes_prints_one_error_line_and_no_onnx_runtime_log(tmp_path: Path) -> None:
    """Before: ONNX Runtime's coloured "[E:onnxruntime:, sequential_executor.cc ...]" line came first (written by
    its C++ logger to file descriptor 2, so only a subprocess sees it), and the error advised --calibration."""
    path = tmp_path / "broken.onnx"
    onnx.save(broken_conv(), path)
    done = subprocess.run([sys.executable, "-m", "app.cli", "optimize", str(path), "--out", str(tmp_path / "out"),
                           "--precision", "fp32", "--time-budget", "10", "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: the model fails on inputs of its own declared shapes (x [1, 3, 8, 8]): "), lines
    assert "--calibration" not in lines[0] and "onnxruntime:" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_kept_original_is_written_as_the_input_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: model.onnx was the optimizer's loaded copy (shape inference's value_info added): another file, whose
    sha256 was not the report's source sha256."""
    path = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), path)
    # a budget nothing fits in: every candidate is skipped and the original is kept
    assert main(["optimize", str(path), "--out", str(tmp_path / "out"), "--precision", "fp32",
                 "--time-budget", "0.001", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["selected"] == "original"
    written = (tmp_path / "out" / "model.onnx").read_bytes()
    assert written == path.read_bytes()
    assert hashlib.sha256(written).hexdigest() == report["source"]["sha256"]
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_an_old_opset_names_the_converter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "old.onnx"
    onnx.save(_relu(1), path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ONNX Runtime cannot load the model: Could not find an implementation for Relu(1)")
    assert "older than ONNX Runtime runs (7 and newer): convert it with onnx's version converter" in err

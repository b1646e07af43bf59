"""An already-quantized model is not quantized again (review-lib F11): its INT8 variants are skipped with a note that
says why, for an explicit INT8 request and for auto. Real ONNX Runtime: the model is our own dynamic-INT8 MLP."""

from __future__ import annotations

from pathlib import Path

import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from optimizer.pipeline import OptimizeConfig, optimize
from tests import models

FAST = {"benchmark_seconds": 0.2, "batch_sizes": (1,)}


@pytest.fixture(scope="module")
def int8_mlp(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """tests.models.mlp quantized by ONNX Runtime's own quantize_dynamic (MatMulInteger, DynamicQuantizeLinear)."""
    folder = tmp_path_factory.mktemp("int8")
    (folder / "fp32.onnx").write_bytes(models.mlp().SerializeToString())
    quantize_dynamic(folder / "fp32.onnx", folder / "int8.onnx", weight_type=QuantType.QInt8)
    data = (folder / "int8.onnx").read_bytes()
    assert b"MatMulInteger" in data
    return data


@pytest.mark.parametrize("precision", ["int8", "auto"])
def test_an_int8_model_is_not_quantized_again(int8_mlp: bytes, tmp_path: Path, precision: str) -> None:
    report = optimize(int8_mlp, out_dir=tmp_path,
                      config=OptimizeConfig(precision=precision, int8_mode="dynamic", **FAST)).report
    assert not [v["name"] for v in report["variants"] if v["precision"] == "int8"]
    reasons = [s["reason"] for s in report["skipped_candidates"]]
    assert any(r.startswith("the model is already quantized (") for r in reasons), reasons

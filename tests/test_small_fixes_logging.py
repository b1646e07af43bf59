"""ONNX Runtime's quantization tools log advice through the root logger ("WARNING:root:Please use QuantFormat.QDQ
...", twice per QOperator S8S8 build in `onnxforge optimize` and bench/auto.py): optimizer.quiet routes those
records to the "onnxruntime.quantization" logger at debug level; ORT's errors and everyone else's warnings still
print."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import onnx

from tests import models

ROOT = Path(__file__).resolve().parent.parent
ADVICE = "Please use QuantFormat.QDQ for activation type QInt8 and weight type QInt8"
# ORT's own code logging its advice on the root logger, as its static quantization does for a QOperator S8S8 build
ORT_ADVICE = ("from onnxruntime.quantization import QuantFormat, QuantType\n"
              "from onnxruntime.quantization.quantize import check_static_quant_arguments\n"
              "check_static_quant_arguments(QuantFormat.QOperator, QuantType.QInt8, QuantType.QInt8)\n")


def _stderr(*parts: str) -> str:
    """The stderr of a Python process running the parts (each dedented), one after the other."""
    script = "\n".join(textwrap.dedent(part) for part in parts)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_without_the_filter_ort_prints_its_advice_on_stderr() -> None:  # the text the filter is about, for real
    assert f"WARNING:root:{ADVICE}" in _stderr(ORT_ADVICE)


def test_ort_advice_is_debug_and_errors_and_other_warnings_still_print() -> None:
    err = _stderr("""
        import logging, onnxruntime, os
        from optimizer.quiet import route_ort_warnings
        route_ort_warnings()
        route_ort_warnings()  # twice: one filter
        assert len(logging.getLogger().filters) == 1
    """, ORT_ADVICE, """
        ort_file = os.path.join(os.path.dirname(onnxruntime.__file__), "quantization", "quantize.py")
        logging.getLogger().handle(logging.LogRecord("root", logging.ERROR, ort_file, 1, "ORT real error", (), None))
        logging.warning("our own warning")
    """)
    assert ADVICE not in err, err
    assert "ERROR:root:ORT real error" in err and "WARNING:root:our own warning" in err, err


def test_at_debug_level_the_advice_is_logged_on_the_onnxruntime_quantization_logger() -> None:
    err = _stderr("""
        import logging
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        from optimizer.quiet import route_ort_warnings
        route_ort_warnings()
    """, ORT_ADVICE)
    lines = [line for line in err.splitlines() if ADVICE in line]
    assert len(lines) == 1 and lines[0].startswith(f"DEBUG onnxruntime.quantization: {ADVICE}"), err
    assert "(WARNING from quantization/quantize.py:" in lines[0], lines


def test_the_optimize_command_routes_it(tmp_path: Path) -> None:
    onnx.save(models.mlp(), tmp_path / "mlp.onnx")
    err = _stderr(f"""
        from app.cli import main
        assert main(["optimize", {str(tmp_path / "mlp.onnx")!r}, "--out", {str(tmp_path / "out")!r},
                     "--precision", "fp32", "--time-budget", "2"]) == 0
    """, ORT_ADVICE)
    assert "WARNING:root" not in err, err

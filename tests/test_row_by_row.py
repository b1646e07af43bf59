"""A variant whose graph mixes the rows of a run (dynamic INT8) answers each row of a request as if sent alone.

DynamicQuantizeLinear takes one scale over every row of a run, so without RowByRow a small row sent beside a large
one is quantized at the large one's scale. Real ONNX Runtime session of a model through quantize_dynamic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnxruntime.quantization import QuantType, quantize_dynamic

from app.runtime.runs import Limited, RowByRow, Watchdog
from optimizer.runtime import create_session
from tests import models


def _dynamic_int8_session(folder: Path):  # noqa: ANN202 - onnxruntime.InferenceSession
    onnx.save(models.mlp(features=64, hidden=128), folder / "mlp.onnx")
    quantize_dynamic(folder / "mlp.onnx", folder / "int8.onnx", per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return create_session((folder / "int8.onnx").read_bytes())


def test_rows_of_one_request_are_answered_as_alone(tmp_path: Path) -> None:
    session = _dynamic_int8_session(tmp_path)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.standard_normal((1, 64)) * scale for scale in (0.1, 100.0, 1.0, 30.0)])
    rows = rows.astype(np.float32)
    alone = np.concatenate([session.run(["logits"], {"features": row[None]})[0] for row in rows])
    watchdog = Watchdog(limit_s=10.0)
    split = RowByRow(session, watchdog).run(["logits"], {"features": rows})[0]
    together = Limited(session, watchdog).run(["logits"], {"features": rows})[0]
    np.testing.assert_array_equal(split, alone)
    # what RowByRow prevents: the 0.1-scale row quantized at the 100-scale row's step loses its answer
    assert not np.allclose(together[0], alone[0], rtol=1e-2, atol=1e-3)
    one = RowByRow(session, watchdog).run(["logits"], {"features": rows[:1]})[0]
    np.testing.assert_array_equal(one, alone[:1])

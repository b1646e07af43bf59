"""FeedChecker's float cast (the /v1 JSON path: float64 numbers for a float32/float16 model) gives what
prepare_feed gives, and refuses what it refuses with the same message."""

from __future__ import annotations

import numpy as np
import pytest

from app.errors import BadRequestError
from app.runtime.signature import TensorSpec
from app.services.inputs import FeedChecker, prepare_feed

F32 = TensorSpec("x", "tensor(float)", np.dtype(np.float32), ("batch", 4))
F16 = TensorSpec("h", "tensor(float16)", np.dtype(np.float16), ("batch", 4))
I64 = TensorSpec("ids", "tensor(int64)", np.dtype(np.int64), ("batch", 4))


@pytest.mark.parametrize(
    "values",
    [
        [[0.1, -2.5, 3.4028234e38, -3.4028234e38]],  # float32's own range, to its edge
        [[np.nan, np.inf, -np.inf, 1.0]],  # NaN and Inf stay what they are
        np.zeros((0, 4)).tolist(),  # no rows
        [[1e-50, 5e-46, 0.0, -0.0]],  # underflow is not overflow
    ],
)
def test_cast_equals_prepare_feed(values: list) -> None:
    given = {"x": np.asarray(values, dtype=np.float64).reshape(-1, 4)}
    fast, slow = FeedChecker([F32])(given), prepare_feed([F32], given)
    assert fast["x"].dtype == slow["x"].dtype == np.float32
    np.testing.assert_array_equal(fast["x"], slow["x"])


@pytest.mark.parametrize(
    ("spec", "values"),
    [
        (F32, [[1.0, 2.0, 3.5e38, 0.0]]),  # past float32's largest: a value that would become Inf
        (F16, [[1.0, 70000.0, 0.0, 0.0]]),
    ],
)
def test_overflow_refused_as_before(spec: TensorSpec, values: list) -> None:
    given = {spec.name: np.asarray(values, dtype=np.float64)}
    with pytest.raises(BadRequestError) as slow:
        prepare_feed([spec], given)
    with pytest.raises(BadRequestError) as fast:
        FeedChecker([spec])(given)
    assert str(fast.value) == str(slow.value)
    assert "too large" in str(fast.value)


def test_first_problem_named_as_before() -> None:
    """An overflow in one input and a shape error in the next: the message is prepare_feed's, in its order."""
    specs = [F32, I64]
    given = {"x": np.array([[1.0, 2.0, 3.0, 1e39]]), "ids": np.ones((1, 3), np.int64)}
    with pytest.raises(BadRequestError) as fast:
        FeedChecker(specs)(given)
    assert "too large for float32" in str(fast.value)
    given["x"] = np.ones((1, 4))
    with pytest.raises(BadRequestError) as fast:
        FeedChecker(specs)(given)
    assert "axis 1 must be 4" in str(fast.value)


def test_float16_and_no_cast() -> None:
    given = {"h": np.array([[1.0, 65504.0, -0.5, 2.0]])}
    out = FeedChecker([F16])(given)["h"]
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, given["h"].astype(np.float16))
    with pytest.raises(BadRequestError, match="expects float16"):  # typed protocols (/v2) get no cast
        FeedChecker([F16])(given, cast=False)

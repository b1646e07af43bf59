"""FeedChecker (the per-model input checks on the hot path) answers exactly as prepare_feed: same feed, same refusal."""

from __future__ import annotations

import numpy as np
import pytest

from app.errors import BadRequestError
from app.runtime.signature import TensorSpec, signature_of
from app.services.inputs import FeedChecker, prepare_feed
from optimizer.runtime import create_session
from tests import models


def _outcome(call):  # noqa: ANN001, ANN202 - what a call returns, or the refusal's message
    try:
        return {name: (array.dtype.str, array.shape, array.tobytes()) for name, array in call().items()}
    except BadRequestError as exc:
        return f"refused: {exc}"


def _cases() -> list[tuple[list[TensorSpec], dict[str, np.ndarray]]]:
    encoder = models.transformer()
    specs, _ = signature_of(create_session(encoder.SerializeToString()))  # [batch,seq,64] float, [batch,seq] int64
    good = models.random_feed(encoder, batch=2, seq=3)
    typed = models.typed_io()
    typed_specs, _ = signature_of(create_session(typed.SerializeToString()))  # fp16, bool, uint8, strings
    fixed = [TensorSpec("x", "tensor(float)", np.dtype(np.float32), (1, 4))]
    free = [TensorSpec("x", "tensor(float)", np.dtype(np.float32), None), TensorSpec("y", "tensor(float)", None, (2,))]
    return [
        (specs, good),
        (specs, {**good, "attention_mask": good["attention_mask"].astype(np.int32)}),  # a cast (or a refusal)
        (specs, {**good, "attention_mask": np.ones((2, 4), np.int64)}),  # seq 3 here, 4 there
        (specs, {**good, "attention_mask": np.ones((3, 3), np.int64)}),  # batch 2 here, 3 there
        (specs, {**good, "hidden_states": good["hidden_states"][..., :32]}),  # the fixed axis is 64
        (specs, {**good, "hidden_states": good["hidden_states"][0]}),  # a dimension missing
        (specs, {"hidden_states": good["hidden_states"]}),  # an input missing
        (specs, {**good, "extra": good["attention_mask"]}),  # an input the model does not have
        (specs, {"hidden_states": good["hidden_states"], "extra": good["attention_mask"]}),  # as many, one wrong
        (typed_specs, models.random_feed(typed, batch=2)),
        (fixed, {"x": np.zeros((1, 4), np.float32)}),
        (fixed, {"x": np.zeros((2, 4), np.float32)}),
        (fixed, {"x": np.zeros((1, 4), np.float64)}),
        (free, {"x": np.zeros((3, 5), np.float32), "y": np.zeros(2, np.float32)}),  # predict cannot feed `y`
    ]


@pytest.mark.parametrize("case", range(14))
@pytest.mark.parametrize("cast", [False, True])
@pytest.mark.parametrize("limit", [None, 5])
def test_the_checker_answers_as_prepare_feed(case: int, cast: bool, limit: int | None) -> None:
    specs, given = _cases()[case]
    expected = _outcome(lambda: prepare_feed(specs, given, cast=cast, max_elements=limit))
    assert _outcome(lambda: FeedChecker(specs)(given, cast=cast, max_elements=limit)) == expected


def test_the_checker_passes_a_fitting_feed_through_unchanged() -> None:
    encoder = models.transformer()
    specs, _ = signature_of(create_session(encoder.SerializeToString()))
    feed = models.random_feed(encoder, batch=2, seq=3)
    checked = FeedChecker(specs)(feed, cast=False)
    assert list(checked) == [s.name for s in specs]  # the session's order
    assert all(checked[name] is feed[name] for name in feed)  # no copy

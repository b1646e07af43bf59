"""A Paddle2ONNX model's '?' dimensions are unknown, not one shared size, when its original serves too.

Found by a user review: PP-OCR's direction classifier ([-1, 3, '?', '?']) calibrated and became ready, yet every
real 48x192 crop got a 400 ("a dimension named '?' must have one size across inputs"): the optimizer read '?' as
unknown, the service's input check (read off the session of the uploaded file) as one named size.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from tests.test_loading import _paddle_style_model


def test_a_question_mark_dim_takes_any_size_on_the_served_original(serve) -> None:  # noqa: ANN001
    model = _paddle_style_model()
    crop = np.random.default_rng(2).normal(size=(1, 3, 48, 192)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": crop})[0]
    with serve() as api:
        accepted = api.upload(model, name="cls", precision="fp32")
        assert accepted.status_code == 202, accepted.text
        assert api.wait(accepted.json()["job_id"])["status"] == "succeeded"
        for variant in ("original", "optimized"):
            answer = api.predict("cls", {"x": crop}, variant=variant)
            assert answer.status_code == 200, (variant, answer.text)
            np.testing.assert_allclose(answer.json()["outputs"]["y"], expected, rtol=1e-5, atol=1e-5)
        metadata = api.client.get("/v2/models/cls").json()
        assert metadata["inputs"][0]["shape"] == [-1, 3, -1, -1], metadata

"""/v1 predict reads NaN and Infinity tokens, as Python's json (requests' `json=`) writes them for float NaN/Inf;
orjson alone refused the whole body as not valid JSON. Anything else that is not JSON is still a 422."""

from __future__ import annotations

import json

import numpy as np

from optimizer.runtime import create_session
from tests import models


def test_nan_and_infinity_tokens_are_read_as_floats(serve) -> None:  # noqa: ANN001
    mlp = models.mlp()
    feed = models.random_feed(mlp, batch=2)
    rows = feed["features"].astype(np.float64).tolist()
    rows[0][3] = float("nan")
    rows[0][5] = float("inf")
    body = json.dumps({"inputs": {"features": rows}})  # Python's json: bare NaN and Infinity tokens
    assert "NaN" in body and "Infinity" in body
    with serve(run_worker=False) as api:
        assert api.upload(mlp, name="mlp").status_code == 202
        response = api.client.post("/v1/models/mlp/predict", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        logits = response.json()["outputs"]["logits"]
        session = create_session(mlp.SerializeToString())
        (expected,) = session.run(["logits"], {"features": np.asarray(rows, np.float32)})
        assert all(value is None for value in logits[0]) and np.isnan(expected[0]).all()  # NaN in, NaN (null) out
        np.testing.assert_allclose(np.asarray(logits[1], np.float32), expected[1], rtol=1e-6)

        broken = api.client.post("/v1/models/mlp/predict", content=body.replace("NaN", "NaN,"),
                                 headers={"content-type": "application/json"})
        assert broken.status_code == 422 and "not valid JSON" in broken.json()["error"]

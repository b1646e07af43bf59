"""/v1 predict reads and writes JSON with orjson (no pydantic model on the hot path): same answers,
same refusals, and what JSON cannot hold (NaN, Inf) still comes back as null."""

from __future__ import annotations

import numpy as np
import pytest

from optimizer.runtime import create_session
from tests import models


def test_outputs_equal_onnx_runtime_and_keep_their_types(serve) -> None:  # noqa: ANN001
    mlp, typed = models.mlp(), models.typed_io()
    with serve(run_worker=False) as api:
        assert api.upload(mlp, name="mlp").status_code == 202
        assert api.upload(typed, name="typed").status_code == 202
        feed = models.random_feed(mlp, batch=3)
        response = api.predict("mlp", feed)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert (body["model"], body["version"], body["variant"]) == ("mlp", 1, "original")
        (expected,) = create_session(mlp.SerializeToString()).run(["logits"], feed)
        np.testing.assert_allclose(np.asarray(body["outputs"]["logits"], np.float32), expected, rtol=1e-6)

        feed = {"half": np.array([[0.5, -1.25, 3.0, 1000.0]] * 2, np.float16),
                "flag": np.array([[True, False, True, False]] * 2), "small": np.array([[0, 1, 254, 255]] * 2, np.uint8),
                "text": np.array(["héllo", "wörld"], object)}
        response = api.predict("typed", feed)
        assert response.status_code == 200, response.text
        session = create_session(typed.SerializeToString())
        names = [o.name for o in session.get_outputs()]
        for name, value in zip(names, session.run(names, feed), strict=True):
            got = response.json()["outputs"][name]
            if value.dtype == object or value.dtype.kind in "US":
                assert got == value.astype(str).tolist()
            else:
                assert np.asarray(got).tolist() == value.tolist(), name


def test_nan_and_infinity_come_back_as_null(serve) -> None:  # noqa: ANN001
    model = models.mlp()
    feed = {"features": np.full((2, 64), 3.0e38, np.float32)}
    feed["features"][1] = 0.5  # a finite row beside it
    (expected,) = create_session(model.SerializeToString()).run(["logits"], feed)
    assert not np.isfinite(expected[0]).any() and np.isfinite(expected[1]).all()  # the overflow happens
    with serve(run_worker=False) as api:
        assert api.upload(model, name="mlp").status_code == 202
        response = api.predict("mlp", feed)
        assert response.status_code == 200, response.text
        got = response.json()["outputs"]["logits"]
        assert got[0] == [None] * 10
        np.testing.assert_allclose(np.asarray(got[1], np.float32), expected[1], rtol=1e-6)


@pytest.mark.parametrize(("body", "fragment"), [
    (b"[1, 2]", "JSON object"),
    (b'{"inputs": [1, 2]}', "inputs"),
    (b'{"inputs": {}, "variant": 3}', "variant"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_malformed_bodies_are_422_in_the_one_shape(serve, body: bytes, fragment: str) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(models.mlp(), name="mlp").status_code == 202
        response = api.client.post("/v1/models/mlp/predict", content=body,
                                   headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert list(response.json()) == ["error"] and fragment in response.json()["error"]


def test_openapi_still_documents_the_predict_body(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        operation = api.client.get("/openapi.json").json()["paths"]["/v1/models/{name}/predict"]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert "inputs" in schema["properties"] and schema["required"] == ["inputs"]

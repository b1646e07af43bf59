"""Predict: serves the validated original until the optimized variant is ready; checks every input.

No worker runs here (jobs stay queued), so what serves is always the original: its answers must
equal ONNX Runtime's on the same file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.errors import BadRequestError
from app.main import create_app
from app.settings import Settings
from optimizer.runtime import create_session
from tests import models
from tests.conftest import TEST_SETTINGS, Api


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Api:
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path_factory.mktemp("data"), "run_worker": False})
    with TestClient(create_app(settings)) as client:
        api = Api(client)
        for name, model in (("mlp", models.mlp()), ("encoder", models.transformer())):
            assert api.upload(model, name=name).status_code == 202
        yield api


def _reference(model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:  # noqa: ANN001
    return create_session(model.SerializeToString()).run(None, feed)


def test_predict_serves_the_original_meanwhile_and_equals_onnx_runtime(api: Api) -> None:
    model = models.transformer()
    feed = models.random_feed(model, batch=2, seq=5)
    feed["attention_mask"][1, 3:] = 0
    response = api.predict("encoder", feed)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["variant"]) == ("encoder", 1, "original")
    got = np.asarray(body["outputs"]["last_hidden_state"], np.float32)
    np.testing.assert_allclose(got, _reference(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_json_numbers_are_cast_to_the_model_dtypes(api: Api) -> None:
    model = models.mlp()
    ints = np.arange(64, dtype=np.int64).reshape(1, 64) % 3  # JSON integers for a float32 input
    response = api.predict("mlp", {"features": ints.tolist()}, version=1)
    assert response.status_code == 200, response.text
    expected = _reference(model, {"features": ints.astype(np.float32)})[0]
    np.testing.assert_allclose(np.asarray(response.json()["outputs"]["logits"]), expected, rtol=1e-5, atol=1e-5)


def _encoder_feed(**changes: Any) -> dict[str, Any]:
    feed: dict[str, Any] = {k: v.tolist() for k, v in models.random_feed(models.transformer(), batch=2, seq=4).items()}
    feed.update(changes)
    return {k: v for k, v in feed.items() if v is not None}


BAD_INPUTS = {
    "unknown name": (_encoder_feed(hidden=[[0.0]]), "unknown input 'hidden'"),
    "missing input": (_encoder_feed(attention_mask=None), "missing input 'attention_mask'"),
    "wrong rank": (_encoder_feed(hidden_states=[[0.0] * 64]), "input 'hidden_states' expects 3 dimensions"),
    "wrong fixed dim": (_encoder_feed(hidden_states=np.zeros((2, 4, 63)).tolist()), "axis 2 must be 64"),
    "dims that must agree": (_encoder_feed(attention_mask=np.ones((3, 4), int).tolist()),
                             "'attention_mask' has batch=3"),
    "strings for floats": (_encoder_feed(hidden_states=[[["a"] * 64] * 4] * 2),
                           "input 'hidden_states' expects float32 numbers, got strings"),
    "fraction for int64": (_encoder_feed(attention_mask=[[1, 0.5, 1, 1]] * 2), "input 'attention_mask' expects int64"),
    "null values": (_encoder_feed(attention_mask=[[1, None, 1, 1]] * 2), "input 'attention_mask' must hold numbers"),
    "ragged lists": (_encoder_feed(attention_mask=[[1, 1, 1, 1], [1]]), "input 'attention_mask' is not a rectangular"),
    "float32 overflow": (_encoder_feed(hidden_states=np.full((2, 4, 64), 1e39).tolist()), "too large for float32"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_gets_400_naming_it(api: Api, case: str) -> None:
    feed, fragment = BAD_INPUTS[case]
    response = api.predict("encoder", feed)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


def test_int_range_is_checked_against_the_dtype(api: Api) -> None:
    feed = _encoder_feed(attention_mask=[[2**63, 1, 1, 1]] * 2)  # arrives as float64: 9.223372036854776e18
    response = api.predict("encoder", feed)
    assert response.status_code == 400
    assert "attention_mask" in response.json()["error"]


def test_optimized_variant_before_it_is_ready_is_a_conflict(api: Api) -> None:
    response = api.predict("mlp", models.random_feed(models.mlp()), variant="optimized")
    assert response.status_code == 409
    assert "still optimizing" in response.json()["error"]
    assert api.client.get("/v1/models/mlp/report").status_code == 409
    assert api.client.get("/v1/models/mlp/artifact?variant=optimized").status_code == 409


def test_original_artifact_downloads_as_uploaded(api: Api) -> None:
    response = api.client.get("/v1/models/mlp/artifact")
    assert response.status_code == 200
    assert response.content == models.mlp().SerializeToString()
    assert 'filename="mlp-v1-original.onnx"' in response.headers["content-disposition"]


@pytest.mark.parametrize(("method", "path", "body", "status", "fragment"), [
    ("post", "/v1/models/nope/predict", {"inputs": {}}, 404, "no model 'nope'"),
    ("post", "/v1/models/mlp/versions/7/predict", {"inputs": {}}, 404, "has no version 7"),
    ("post", "/v1/models/mlp/versions/abc/predict", {"inputs": {}}, 404, "versions are numbers"),
    ("post", "/v1/models/mlp/predict", {"input": {}}, 422, "inputs"),
    ("post", "/v1/models/mlp/predict", {"inputs": {}, "variant": "fast"}, 422, "variant"),
    ("get", "/v1/jobs/nope", None, 404, "no job 'nope'"),
    ("get", "/v1/nothing/here", None, 404, "no such route"),
    ("put", "/v1/models", None, 405, "not allowed"),
    ("get", "/v1/models/mlp/artifact?variant=fast", None, 400, "variant must be"),
])
def test_errors_have_one_shape(api: Api, method: str, path: str, body: dict | None, status: int, fragment: str) -> None:
    response = getattr(api.client, method)(path, **({"json": body} if body is not None else {}))
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"]
    assert fragment in response.json()["error"]


def test_malformed_json_is_422(api: Api) -> None:
    response = api.client.post("/v1/models/mlp/predict", content=b"{not json",
                               headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert list(response.json()) == ["error"]


def test_metrics_count_predicts_per_model_version_and_variant(api: Api) -> None:
    before = api.client.get("/metrics").text
    assert api.predict("mlp", models.random_feed(models.mlp())).status_code == 200
    assert api.predict("mlp", {"features": [[1.0]]}).status_code == 400
    text = api.client.get("/metrics").text

    def count(series: str, body: str) -> float:
        lines = [line for line in body.splitlines() if line.startswith(series + " ")]
        return float(lines[0].split()[-1]) if lines else 0.0

    ok = 'onnxforge_predict_requests_total{model="mlp",outcome="ok",variant="original",version="1"}'
    rejected = 'onnxforge_predict_requests_total{model="mlp",outcome="rejected",variant="original",version="1"}'
    failed = 'onnxforge_predict_requests_total{model="mlp",outcome="failed",variant="original",version="1"}'
    assert count(ok, text) == count(ok, before) + 1
    assert count(rejected, text) == count(rejected, before) + 1  # a wrong shape: the client's to fix
    assert count(failed, text) == count(failed, before)  # no run failed
    assert 'onnxforge_predict_latency_seconds_count{model="mlp",variant="original",version="1"}' in text
    assert 'onnxforge_jobs{status="queued"} 2.0' in text
    assert 'route="/v1/models/{name}/predict"' in text


def test_health_and_readiness(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "alive"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["worker"] == "external"
    assert "/v1/models" in api.client.get("/openapi.json").json()["paths"]


def test_readiness_fails_when_storage_is_gone(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        artifacts = api.services.settings.artifacts_dir
        artifacts.rename(artifacts.with_name("moved"))
        response = api.client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["error"].startswith("not ready: storage")


def test_deleted_model_stops_serving_and_its_session_is_dropped(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        api.upload(models.mlp(), name="gone")
        assert api.predict("gone", models.random_feed(models.mlp())).status_code == 200
        assert len(api.services.sessions) == 1
        assert api.client.delete("/v1/models/gone").status_code == 200
        assert len(api.services.sessions) == 0
        assert api.predict("gone", models.random_feed(models.mlp())).status_code == 404
        assert api.client.delete("/v1/models/gone").status_code == 404


def test_typed_protocols_get_no_casting() -> None:
    """/v2 sends typed tensors: a dtype mismatch is refused instead of cast (cast=False)."""
    from app.runtime.signature import signature_of
    from app.services.inputs import prepare_feed

    inputs, _ = signature_of(create_session(models.transformer().SerializeToString()))
    feed = models.random_feed(models.transformer(), batch=1, seq=3)
    assert prepare_feed(inputs, feed, cast=False)["attention_mask"].dtype == np.int64
    feed["attention_mask"] = feed["attention_mask"].astype(np.int32)
    with pytest.raises(BadRequestError, match="input 'attention_mask' expects int64, got int32"):
        prepare_feed(inputs, feed, cast=False)
    assert prepare_feed(inputs, feed, cast=True)["attention_mask"].dtype == np.int64
    with pytest.raises(BadRequestError, match="'hidden_states' has 3 elements, more than the limit of 2"):
        prepare_feed(inputs, {"hidden_states": np.zeros((1, 3, 64), np.float32)[:, :, :1],
                              "attention_mask": np.ones((1, 3), np.int64)}, max_elements=2)

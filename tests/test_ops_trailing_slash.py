"""A trailing slash is answered in place, never redirected: Starlette's redirect (GET /v1/models/ -> 307) built an
absolute URL from the scheme uvicorn saw, which behind a TLS proxy (proxy headers off) is http://, and a
redirected POST (an upload) sent its body twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests import models
from tests.conftest import TEST_SETTINGS, Api

ADMIN, READ = "admin-key-0123456789abcdef", "read-key-0123456789abcdef"
# What a TLS-terminating proxy sends; uvicorn's proxy headers are off, so the app sees http either way.
PROXIED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "models.example.com"}


def _app(tmp_path: Path, **overrides: object) -> TestClient:
    settings = Settings(
        **{
            **TEST_SETTINGS,
            "data_dir": tmp_path,
            "run_worker": False,
            "api_keys": f"admin:{ADMIN},read:{READ}",
            **overrides,
        }
    )
    return TestClient(create_app(settings), follow_redirects=False)


def _as(key: str) -> dict[str, str]:
    return {**PROXIED, "Authorization": f"Bearer {key}"}


def test_api_routes_answer_with_a_trailing_slash_in_place(tmp_path: Path) -> None:
    with _app(tmp_path) as client:
        api = Api(client)
        client.headers.update(_as(ADMIN))
        accepted = api.upload(models.mlp(), "good.onnx")
        assert accepted.status_code == 202, accepted.text
        # The upload itself through /v1/models/: accepted in place (was a 307 the client re-POSTed to).
        client.headers.update(_as(ADMIN))
        again = client.post("/v1/models/", files={"file": ("good.onnx", models.mlp().SerializeToString())})
        assert again.status_code == 202 and "location" in again.headers, again.text
        assert again.headers["location"] == f"/v1/jobs/{again.json()['job_id']}"  # the job, not a redirect
        assert again.json()["version"] == 2

        client.headers.update(_as(READ))
        for path in (
            "/v1/models",
            "/v1/models/good",
            "/v1/models/good/versions/1",
            f"/v1/jobs/{accepted.json()['job_id']}",
            "/v2/models/good",
            "/healthz",
            "/readyz",
        ):
            plain, slashed = client.get(path), client.get(path + "/")
            assert plain.status_code == 200, (path, plain.text)
            assert (slashed.status_code, slashed.headers.get("location")) == (200, None), (path, slashed.text)
            assert slashed.json() == plain.json(), path

        # Predict (the fast path) and v2 infer with a slash give the same numbers, with the read key.
        features = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
        body = {"inputs": {"features": features.tolist()}}
        plain = client.post("/v1/models/good/predict", json=body)
        slashed = client.post("/v1/models/good/predict/", json=body)
        assert plain.status_code == slashed.status_code == 200, slashed.text
        np.testing.assert_array_equal(
            np.asarray(slashed.json()["outputs"]["logits"]), np.asarray(plain.json()["outputs"]["logits"])
        )
        assert np.asarray(plain.json()["outputs"]["logits"]).shape == (2, 10)
        infer = {
            "inputs": [{"name": "features", "shape": [2, 64], "datatype": "FP32", "data": features.ravel().tolist()}]
        }
        v2 = client.post("/v2/models/good/infer/", json=infer)
        assert v2.status_code == 200, v2.text
        np.testing.assert_allclose(
            np.asarray(v2.json()["outputs"][0]["data"]).reshape(2, 10),
            np.asarray(plain.json()["outputs"]["logits"]),
            rtol=1e-6,
        )

        # The slash changes no role: deleting with the read key is refused, with the admin key it deletes.
        assert client.delete("/v1/models/good/versions/2/").status_code == 403
        client.headers.update(_as(ADMIN))
        deleted = client.delete("/v1/models/good/versions/2/")
        assert deleted.status_code == 200 and deleted.json() == {"deleted": "good", "version": 2}

        # A path that names nothing is a plain 404, with or without the slash, and never a redirect.
        for path in ("/v1/nothing", "/v1/nothing/", "/v1/models/good/nothing/"):
            missing = client.get(path)
            assert (missing.status_code, missing.headers.get("location")) == (404, None), path

        # /metrics counts the slashed requests under the route's template.
        scrape = client.get("/metrics/").text
        assert (
            'onnxforge_http_requests_total{method="POST",route="/v1/models/{name}/predict",status="200"} 2.0' in scrape
        )


def test_the_dashboard_keeps_its_slash_also_under_a_root_path(tmp_path: Path) -> None:
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path, "run_worker": False})
    for root in ("", "/onnxforge"):
        with TestClient(create_app(settings), root_path=root, follow_redirects=False) as client:
            page = client.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), root
            listed = client.get("/v1/models/")
            assert (listed.status_code, listed.json()) == (200, []), root

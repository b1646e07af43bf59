"""Access control and request limits: API keys (read/admin), CORS, the predict body limit."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.security import ApiKeyConfigError, parse_api_keys, required_role
from app.settings import Settings
from tests import models
from tests.conftest import TEST_SETTINGS, Api

ADMIN_KEY = "admin-key-0123456789abcdef"
READ_KEY = "read-key-0123456789abcdef"
FILE_KEY = "file-key-0123456789abcdef"


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Api:
    """One app with keys from the setting and from a file, CORS for one origin, a small predict body limit."""
    root = tmp_path_factory.mktemp("access")
    keys_file = root / "keys"
    keys_file.write_text(f"# keys for tests\nread:{FILE_KEY}\n")
    settings = Settings(**{**TEST_SETTINGS, "data_dir": root / "data", "run_worker": False,
                           "api_keys": f"admin:{ADMIN_KEY}, read:{READ_KEY}", "api_keys_file": keys_file,
                           "cors_origins": "https://ui.example", "max_predict_body_bytes": 20_000})
    with TestClient(create_app(settings)) as client:
        api = Api(client)
        model = models.mlp().SerializeToString()
        response = client.post("/v1/models", files={"file": ("good.onnx", model)}, headers=_auth(ADMIN_KEY))
        assert response.status_code == 202, response.text
        yield api


def _feed() -> dict[str, list]:
    return {k: v.tolist() for k, v in models.random_feed(models.mlp(), batch=1).items()}


def test_no_key_or_wrong_key_is_401_and_touches_nothing(api: Api) -> None:
    client = api.client
    for headers in ({}, _auth("wrong-key-0123456789abcdef"), {"Authorization": ADMIN_KEY},
                    {"Authorization": f"Basic {ADMIN_KEY}"}, _auth(ADMIN_KEY[:-1])):
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/good"), ("DELETE", "/v1/models/good"),
                             ("POST", "/v1/models/good/predict"), ("GET", "/v2/models/good"),
                             ("POST", "/v2/models/good/infer"), ("GET", "/v1/jobs/nope"), ("GET", "/v2")):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert "API key" in response.json()["error"]
            assert response.headers["www-authenticate"].startswith("Bearer")
        response = client.post("/v1/models", files={"file": ("x.onnx", models.mlp().SerializeToString())},
                               headers=headers)
        assert response.status_code == 401
    listed = client.get("/v1/models", headers=_auth(READ_KEY)).json()
    assert [(m["name"], m["versions"]) for m in listed] == [("good", 1)]


def test_health_metrics_and_docs_stay_open(api: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/openapi.json"):
        assert api.client.get(path).status_code == 200, path


def test_read_key_reads_and_predicts_but_cannot_change(api: Api) -> None:
    client = api.client
    for key in (READ_KEY, FILE_KEY):
        assert client.get("/v1/models/good", headers=_auth(key)).status_code == 200
        response = client.post("/v1/models/good/predict", json={"inputs": _feed()}, headers=_auth(key))
        assert response.status_code == 200, response.text
        v2 = {"inputs": [{"name": name, "shape": list(np.shape(value)), "datatype": "FP32", "data": value}
                         for name, value in _feed().items()]}
        assert client.post("/v2/models/good/infer", json=v2, headers=_auth(key)).status_code == 200
        response = client.delete("/v1/models/good", headers=_auth(key))
        assert response.status_code == 403 and "read-only" in response.json()["error"]
        response = client.post("/v1/models", files={"file": ("x.onnx", models.mlp().SerializeToString())},
                               headers=_auth(key))
        assert response.status_code == 403
    assert client.get("/v1/models/good", headers=_auth(ADMIN_KEY)).json()["name"] == "good"


def test_admin_key_uploads_and_deletes(api: Api) -> None:
    client = api.client
    model = models.mlp().SerializeToString()
    response = client.post("/v1/models", files={"file": ("other.onnx", model)}, headers=_auth(ADMIN_KEY))
    assert response.status_code == 202, response.text
    assert client.delete("/v1/models/other", headers=_auth(ADMIN_KEY)).status_code in (200, 204)
    assert client.get("/v1/models/other", headers=_auth(ADMIN_KEY)).status_code == 404


def test_cors_only_for_the_configured_origin(api: Api) -> None:
    client = api.client
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    response = client.options("/v1/models/good/predict", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://ui.example"
    response = client.get("/v1/models", headers={"Origin": "https://ui.example"})
    assert response.status_code == 401  # CORS does not stand in for a key; the page can read the 401
    assert response.headers["access-control-allow-origin"] == "https://ui.example"
    response = client.get("/v1/models", headers={"Origin": "https://evil.example", **_auth(READ_KEY)})
    assert "access-control-allow-origin" not in response.headers
    response = client.options("/v1/models", headers={**preflight, "Origin": "https://evil.example"})
    assert response.status_code == 400


def test_cors_is_off_by_default(serve) -> None:  # noqa: ANN001 - conftest fixture
    with serve(run_worker=False) as api:
        response = api.client.get("/v1/models", headers={"Origin": "https://ui.example"})
        assert response.status_code == 200  # and no keys by default: the service is open
        assert "access-control-allow-origin" not in response.headers
        preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "GET"}
        assert "access-control-allow-origin" not in api.client.options("/v1/models", headers=preflight).headers


def test_predict_body_limit_is_413(api: Api) -> None:
    big = {"inputs": {"x": [[0.0] * 64] * 200}}  # ~50 kB of JSON, over the 20 kB limit
    response = api.client.post("/v1/models/good/predict", json=big, headers=_auth(READ_KEY))
    assert response.status_code == 413 and "ONNXFORGE_MAX_PREDICT_BODY_BYTES" in response.json()["error"]

    def chunks():  # noqa: ANN202 - no Content-Length: the limit is enforced as the body streams in
        for _ in range(30):
            yield b" " * 1000
    for path in ("/v2/models/good/infer", "/v1/models/good/predict"):
        response = api.client.post(path, content=chunks(),
                                   headers={**_auth(READ_KEY), "Content-Type": "application/json"})
        assert response.status_code == 413, (path, response.text)
        assert "ONNXFORGE_MAX_PREDICT_BODY_BYTES" in response.json()["error"]
    assert api.client.post("/v1/models/good/predict", json={"inputs": _feed()},
                           headers=_auth(READ_KEY)).status_code == 200


def test_keys_are_never_logged_or_shown(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    settings = api.services.settings
    assert ADMIN_KEY not in repr(settings) and ADMIN_KEY not in settings.model_dump_json()
    with caplog.at_level(logging.DEBUG):
        api.client.get("/v1/models", headers=_auth("wrong-key-0123456789abcdef"))
        api.client.get("/v1/models", headers=_auth(ADMIN_KEY))
        api.client.get("/v1/no-such-route", headers=_auth(ADMIN_KEY))
    assert "0123456789abcdef" not in caplog.text


def test_roles_by_route() -> None:
    assert required_role("GET", "/healthz") is None
    assert required_role("GET", "/v2/health/ready") is None
    assert required_role("POST", "/v1/models") == "admin"
    assert required_role("DELETE", "/v1/models/a/versions/1") == "admin"
    assert required_role("POST", "/v1/models/a/versions/2/predict") == "read"
    assert required_role("POST", "/v2/models/a/versions/2/infer") == "read"
    assert required_role("POST", "/v1/models/a/predict/") == "read"  # answered in place as /predict
    assert required_role("POST", "/v2/models/a/unknown") == "admin"  # a new /v2 route is covered by default
    # tritonclient's read-only POSTs: the repository index, load, shared-memory unregister
    assert required_role("POST", "/v2/repository/index") == "read"
    assert required_role("POST", "/v2/repository/models/a/load") == "read"
    assert required_role("POST", "/v2/systemsharedmemory/unregister") == "read"
    assert required_role("POST", "/v2/cudasharedmemory/region/r/unregister") == "read"
    assert required_role("POST", "/v2/repository/models/a/unload") == "admin"
    assert required_role("GET", "/v2/models/a/stats") == "read"


def test_bad_key_configuration_refuses_to_start(tmp_path: Path) -> None:
    keys = parse_api_keys(f"{ADMIN_KEY}\n#comment\nread:{READ_KEY}")
    assert keys.role_of(ADMIN_KEY) == "admin" and keys.role_of(READ_KEY) == "read" and keys.role_of("x") is None
    with pytest.raises(ApiKeyConfigError, match="unknown role"):
        parse_api_keys(f"writer:{ADMIN_KEY}")
    with pytest.raises(ApiKeyConfigError, match="shorter than 16"):
        parse_api_keys("admin:short")
    with pytest.raises(ApiKeyConfigError, match="cannot read"):
        create_app(Settings(data_dir=tmp_path, api_keys_file=tmp_path / "missing"))

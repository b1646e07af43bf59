"""schemathesis against the service's own OpenAPI schema: for every /v1 route, generated requests
(valid and not) never get a 5xx, and every answer matches the schema.

A few examples per route in the default run; `pytest -m slow` runs many more.
"""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, reject, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from tests import models  # noqa: E402
from tests.conftest import TEST_SETTINGS  # noqa: E402

CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    """The real app (no worker) holding one model named `m`, so that some generated paths hit it."""
    data: Path = tmp_path_factory.mktemp("fuzz")
    app = create_app(Settings(**{**TEST_SETTINGS, "data_dir": data, "run_worker": False}))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/models", files={"file": ("m.onnx", models.mlp().SerializeToString())})
        assert response.status_code == 202, response.text
        yield client


# The schema does not depend on settings or state: read it once, from an app that is never started.
OPERATIONS = {op.label: op for op in (result.ok() for result in schemathesis.openapi.from_dict(
    create_app(Settings(run_worker=False)).openapi()).include(path_regex="^/v1/").get_all_operations())}


def _call_and_check(client: TestClient, case) -> None:  # noqa: ANN001 - schemathesis Case
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    try:
        response = client.request(**{k: v for k, v in kwargs.items() if k in (
            "method", "url", "headers", "params", "json", "content", "data", "files", "cookies")})
        response.request.read()  # a multipart body is a stream; schemathesis reads it to report a failure
    except (AttributeError, TypeError):
        # httpx cannot encode some generated multipart forms (a file part that is a number): such a
        # request is not one a client can send. Server errors cannot land here: they come back as 500s.
        reject()
    case.validate_response(response, checks=CHECKS)


def _fuzz(client: TestClient, label: str, examples: int) -> None:
    @given(case=OPERATIONS[label].as_strategy())
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case) -> None:  # noqa: ANN001 - schemathesis Case
        _call_and_check(client, case)

    run()


def test_every_v1_route_is_fuzzed() -> None:
    assert len(OPERATIONS) >= 13 and {"POST /v1/models", "POST /v1/models/{name}/predict"} <= set(OPERATIONS)


@pytest.mark.parametrize("label", list(OPERATIONS))
def test_v1_route_never_5xx_and_matches_the_schema(client: TestClient, label: str) -> None:
    _fuzz(client, label, examples=6)


@pytest.mark.slow
@pytest.mark.parametrize("label", list(OPERATIONS))
def test_v1_route_long_fuzz(client: TestClient, label: str) -> None:
    _fuzz(client, label, examples=200)


@pytest.mark.parametrize("path", [
    "/v1/models/m/versions/999999999999999999999999999999/artifact",  # found by the long fuzz: was a 500
    "/v1/models/m/versions/%C2%B9",  # '¹': str.isdigit() says yes, int() says no: was a 500
    "/v2/models/m/versions/%C2%B9",
])
def test_version_numbers_that_are_not_versions_are_404(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404 and "versions are numbers" in response.json()["error"]
    assert client.post("/v1/models/m/versions/%C2%B9/predict", json={"inputs": {}}).status_code == 404

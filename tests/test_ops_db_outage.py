"""Predict through a database outage (ops review finding #1): on PostgreSQL, connections to the app's database are
blocked (ALLOW_CONNECTIONS false + pg_terminate_backend, as the reviewer did). A model already served keeps serving
from its cached resolution, past the cache TTL; a model never served by this process gets 503 with Retry-After, not
500; the log has one warning line for the outage and one for its end, no traceback; /readyz stays 200 (degraded)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests import models
from tests.conftest import ADMIN_URL

TTL_S = 0.2


@contextmanager
def blocked(url: str) -> Iterator[None]:
    """No connection to the database at `url` (existing ones cut) inside the block."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def _count(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_served_models_keep_serving_through_a_database_outage(
        serve: Callable[..., Any], new_database: Callable[[], str], caplog: pytest.LogCaptureFixture) -> None:
    url = new_database()
    feed = models.random_feed(models.mlp(), batch=2)
    with serve(database_url=url, run_worker=False, registry_cache_ttl_s=TTL_S) as api:
        assert api.upload(models.mlp(), name="kept").status_code == 202
        assert api.upload(models.mlp(), name="unseen").status_code == 202  # never predicted before the outage
        assert api.predict("kept", feed).status_code == 200
        assert api.predict("kept", feed, version=1).status_code == 200

        with caplog.at_level(logging.INFO), blocked(url):
            time.sleep(3 * TTL_S)  # the cached resolution is stale: the next predict asks the database
            until = time.monotonic() + 2.5  # past the retry interval: asked again, still out, still serving
            while time.monotonic() < until:
                for version in (None, 1):
                    response = api.predict("kept", feed, version=version)
                    assert response.status_code == 200, response.text
                    assert response.json()["version"] == 1
                time.sleep(0.05)

            refused = api.predict("unseen", feed)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "2"
            assert refused.json()["error"].startswith("the model registry's database is unreachable; retry")
            assert api.predict("unseen", feed, version=1).status_code == 503

            listed = api.client.get("/v1/models")  # any route that needs the database: 503, not 500
            assert listed.status_code == 503, listed.text
            assert listed.json() == {"error": "the model registry's database is unreachable; retry"}

            ready = api.client.get("/readyz")  # a shared database's blip must not pull every replica
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "degraded"
            assert ready.json()["database"].startswith("unreachable")
            v2_ready = api.client.get("/v2/health/ready")  # the Open Inference Protocol's probe agrees
            assert v2_ready.status_code == 200, v2_ready.text

            scrape = api.client.get("/metrics")
            assert scrape.status_code == 200
            assert _count(scrape.text, 'onnxforge_predict_requests_total{model="kept",outcome="failed"') == 0
            assert _count(scrape.text, 'onnxforge_predict_requests_total{model="kept",outcome="ok"') > 20
            assert _count(scrape.text, 'onnxforge_http_requests_total{method="POST",route="/v1/models/{name}/predict"'
                                       ',status="503"}') == 1

        deadline = time.monotonic() + 15
        while (back := api.predict("unseen", feed)).status_code == 503:
            assert time.monotonic() < deadline, back.text
            time.sleep(0.1)
        assert back.status_code == 200, back.text
        assert api.predict("kept", feed).status_code == 200
        assert api.client.get("/v1/models").status_code == 200
        assert api.client.get("/readyz").json()["status"] == "ready"

    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    predict_lines = [r.getMessage() for r in caplog.records if r.name == "onnxforge.predict"]
    assert len(predict_lines) == 2, predict_lines
    assert "database is unreachable" in predict_lines[0]
    assert "answers again" in predict_lines[1]

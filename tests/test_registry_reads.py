"""The registry's frequent reads leave the reports (~14 KB of JSON per ready version) in the database: predict
resolves a name from all its live versions every registry_cache_ttl_s, and GET /v1/models reads every model's.
Loading the reports made that 530 ms for a model of 400 versions, and the list 5.5 s for 500 models x 20
versions; the report routes still answer each version's own report."""

from __future__ import annotations

from sqlalchemy import inspect

from tests import models
from tests.test_retention import finish_jobs

BIG_REPORT = {"baseline": "original", "variants": [{"name": f"v{i}", "notes": "x" * 1000} for i in range(20)]}


def test_version_lists_carry_no_report_and_the_report_routes_still_answer(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        for number in (1, 2):
            assert api.upload(models.mlp(), "m.onnx").status_code == 202
            queue = api.services.jobs
            job = queue.claim("w")
            assert queue.succeed(job, "w", report={**BIG_REPORT, "number": number}, selected="original",
                                 provider="cpu")
        finish_jobs(api)
        registry = api.services.registry
        for row in [*registry.versions("m"), registry.resolve("m"), registry.resolve("m", 1)]:
            assert "report" in inspect(row).unloaded, f"version {row.version} was read with its report"
        listed, more = registry.names()
        assert not more and all(not hasattr(row, "report") for row in listed["m"])

        assert api.client.get("/v1/models/m/report").json()["report"]["number"] == 2
        assert api.client.get("/v1/models/m/versions/1/report").json()["report"]["number"] == 1
        assert api.client.get("/v1/models").json()[0]["serving_version"] == 2

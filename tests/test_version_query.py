"""A model-level download or report given `?version=` is a 400 naming the per-version route: it answered for the
serving version instead, with a 200 (upgrade review, 2026-11-28: `artifact?version=2` sent version 1's file)."""

from __future__ import annotations

from tests import models


def test_version_query_on_model_level_routes_is_refused_with_the_route_to_use(serve) -> None:  # noqa: ANN001
    with serve(optimize_time_budget_s=0.001) as api:
        for seed in (1, 2):
            job = api.upload(models.mlp(seed=seed), name="m").json()["job_id"]
            assert api.wait(job)["status"] == "succeeded"
        for what in ("artifact", "report"):
            refused = api.client.get(f"/v1/models/m/{what}?version=2")
            assert refused.status_code == 400, refused.text
            assert f"/v1/models/m/versions/2/{what}" in refused.json()["error"]
            assert api.client.get(f"/v1/models/m/versions/2/{what}").status_code == 200
            assert api.client.get(f"/v1/models/m/{what}").status_code == 200

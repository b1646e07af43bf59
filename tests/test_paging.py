"""GET /v1/models pages: `limit` and `after`, the next page in the Link header; a client that never pages gets
every model as before, up to the cap of 1000 models in one answer."""

from __future__ import annotations

from app.api.models import LIST_CAP
from app.store import ModelVersion
from tests import models
from tests.conftest import Api


def add_models(api: Api, count: int) -> list[str]:
    """`count` models of one ready version each, written straight into the real database (uploading a
    thousand models would take minutes); their files are not needed to list them."""
    names = [f"model-{i:05d}" for i in range(count)]
    with api.services.db.write() as session:
        session.add_all(ModelVersion(name=name, version=1, status="ready", filename="m.onnx", sha256="0" * 64,
                                     size_bytes=1, selected="original", report={"baseline": "original"})
                        for name in names)
    return names


def test_pages_follow_the_link_header_in_name_order(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        names = add_models(api, 5)
        seen, url, pages = [], "/v1/models?limit=2", 0
        while url:
            response = api.client.get(url)
            assert response.status_code == 200, response.text
            seen += [m["name"] for m in response.json()]
            pages += 1
            link = response.headers.get("link")
            url = link.split(";")[0].strip("<>") if link else None
            if link:
                assert link.endswith('; rel="next"') and response.headers["x-next-after"] == seen[-1]
        assert (seen, pages) == (names, 3)
        after = api.client.get("/v1/models", params={"after": names[1], "limit": 1})
        assert [m["name"] for m in after.json()] == [names[2]]


def test_a_client_that_never_pages_gets_every_model_without_a_link(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(models.mlp(), "real.onnx").status_code == 202
        names = add_models(api, 3)
        response = api.client.get("/v1/models")
        assert response.status_code == 200 and "link" not in response.headers
        listed = response.json()
        assert [m["name"] for m in listed] == [*names, "real"]
        assert listed[-1] == {"name": "real", "serving_version": 1, "pinned_version": None,
                              "serving_variant": "original", "latest_version": 1, "latest_status": "queued",
                              "versions": 1}


def test_more_models_than_the_cap_are_answered_a_page_at_a_time(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        names = add_models(api, LIST_CAP + 1)
        first = api.client.get("/v1/models")
        assert [m["name"] for m in first.json()] == names[:LIST_CAP]
        assert first.headers["x-next-after"] == names[LIST_CAP - 1]
        rest = api.client.get(first.headers["link"].split(";")[0].strip("<>"))
        assert [m["name"] for m in rest.json()] == names[LIST_CAP:] and "link" not in rest.headers


def test_a_limit_out_of_range_is_refused(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        for limit in (0, LIST_CAP + 1):
            response = api.client.get("/v1/models", params={"limit": limit})
            assert response.status_code == 400 and "limit must be from 1 to 1000" in response.json()["error"]

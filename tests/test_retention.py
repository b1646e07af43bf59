"""ONNXFORGE_KEEP_VERSIONS: a model replaced daily keeps its newest versions, the one serving and the one pinned;
the older ones are deleted (rows become tombstones, files go) and the upload's answer names them."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from app.settings import Settings
from app.store import ModelVersion
from app.worker.loop import Worker
from tests import models
from tests.conftest import TEST_SETTINGS, Api

WORKER = "test-worker"


def finish_jobs(api: Api) -> None:
    """Run the queue's jobs to success through the real queue (no optimizer: the original is 'selected')."""
    queue = api.services.jobs
    while (job := queue.claim(WORKER)) is not None:
        assert queue.succeed(job, WORKER, report={"baseline": "original"}, selected="original", provider="cpu")


def upload(api: Api, name: str = "m", *, finish: bool = True) -> dict:
    response = api.upload(models.mlp(), f"{name}.onnx", name=name)
    assert response.status_code == 202, response.text
    if finish:
        finish_jobs(api)
    return response.json()


def stored_versions(api: Api, name: str = "m") -> list[int]:
    folder = api.services.settings.artifacts_dir / "models" / name
    return sorted(int(p.name) for p in folder.iterdir()) if folder.is_dir() else []


def live_versions(api: Api, name: str = "m") -> list[int]:
    return [v["version"] for v in api.client.get(f"/v1/models/{name}").json()["versions"]]


def test_uploads_delete_versions_beyond_the_newest_but_never_the_serving_or_pinned_one(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, keep_versions=2) as api:
        assert [upload(api)["removed_versions"] for _ in range(2)] == [[], []]
        assert api.client.put("/v1/models/m/serving", json={"version": 1}).status_code == 200
        assert upload(api, finish=False)["removed_versions"] == []  # v3, v2 the newest; v1 pinned

        answer = upload(api, finish=False)  # v4, v3 the newest; v1 pinned: v2 goes
        assert (answer["version"], answer["removed_versions"]) == (4, [2])
        assert live_versions(api) == [1, 3, 4]
        assert stored_versions(api) == [1, 3, 4]
        assert api.client.get("/v1/models/m/versions/2").status_code == 404
        with api.services.db.read() as session:  # a tombstone: its report is gone with its files
            row = session.scalars(select(ModelVersion).where(ModelVersion.name == "m", ModelVersion.version == 2)).one()
            assert (row.status, row.report, row.deleted_at is not None) == ("deleted", None, True)

        # unpinned, v1 still serves (v3 and v4 optimize): it stays, v3 goes
        assert api.client.delete("/v1/models/m/serving").status_code == 200
        answer = upload(api, finish=False)
        assert (answer["version"], answer["removed_versions"]) == (5, [3])
        assert live_versions(api) == [1, 4, 5]
        assert stored_versions(api) == [1, 4, 5]
        feed = models.random_feed(models.mlp(), batch=1)
        assert api.predict("m", feed).json()["version"] == 1

        finish_jobs(api)  # v5 serves now: v1 and v4 go with the next upload, whose number is new
        answer = upload(api, finish=False)
        assert (answer["version"], answer["removed_versions"]) == (6, [1, 4])
        assert live_versions(api) == [5, 6]
        assert stored_versions(api) == [5, 6]
        assert api.predict("m", feed).json()["version"] == 5


def test_without_the_setting_every_version_is_kept(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        for _ in range(4):
            assert upload(api)["removed_versions"] == []
        assert live_versions(api) == [1, 2, 3, 4]
        assert stored_versions(api) == [1, 2, 3, 4]


def test_a_worker_applies_the_setting_at_start_to_models_nobody_uploads_to(serve, data_dir: Path) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        for _ in range(4):
            upload(api)
        upload(api, "other")
        settings = Settings(**{**TEST_SETTINGS, "data_dir": data_dir, "run_worker": False, "keep_versions": 2})
        worker = Worker(settings, db=api.services.db, store=api.services.store)
        retired = worker.retire_old_versions()
        assert {name: [number for _, number in gone] for name, gone in retired.items()} == {"m": [1, 2]}
        assert live_versions(api) == [3, 4]
        assert stored_versions(api) == [3, 4]
        assert live_versions(api, "other") == [1]
        assert worker.retire_old_versions() == {}

"""Artifact folders no live version owns are removed when a worker starts: a deleted version's files left by a crash
between the delete's commit and the file removal, and an upload's files stored before a crash kept its commit."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import update

from app.settings import Settings
from app.store import ModelVersion
from app.worker.loop import Worker
from tests import models
from tests.conftest import TEST_SETTINGS


def stored(artifacts: Path) -> set[tuple[str, int]]:
    return {(p.parent.name, int(p.name)) for p in artifacts.glob("models/*/*") if any(p.iterdir())}


def test_a_starting_worker_removes_the_files_of_deleted_and_never_committed_versions(serve, data_dir: Path) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        for _ in range(3):
            assert api.upload(models.mlp(), "m.onnx").status_code == 202
        artifacts = api.services.settings.artifacts_dir
        # what a crash right after DELETE /v1/models/m/versions/2 committed leaves: a tombstone and its files
        with api.services.db.write() as session:
            session.execute(update(ModelVersion).where(ModelVersion.name == "m", ModelVersion.version == 2)
                            .values(status="deleted"))
        # what uploads cut off before their commit leave: files, no version (an old one, and one maybe in flight)
        for name, number, age_s in (("m", 9, 2 * 3600), ("cut", 1, 2 * 3600), ("m", 10, 5)):
            folder = artifacts / "models" / name / str(number)
            folder.mkdir(parents=True)
            (folder / "original.onnx").write_bytes(b"x" * 1000)
            os.utime(folder / "original.onnx", (time.time() - age_s,) * 2)
        assert stored(artifacts) == {("m", 1), ("m", 2), ("m", 3), ("m", 9), ("cut", 1), ("m", 10)}

        settings = Settings(**{**TEST_SETTINGS, "data_dir": data_dir, "run_worker": False})
        worker = Worker(settings, db=api.services.db, store=api.services.store)
        assert worker.sweep_orphaned_artifacts() == [("m", 2), ("m", 9)]
        # a model the database never knew is left alone: the worker may be pointed at the wrong (or a new) database
        assert stored(artifacts) == {("m", 1), ("m", 3), ("cut", 1), ("m", 10)}
        assert worker.sweep_orphaned_artifacts() == []
        feed = models.random_feed(models.mlp(), batch=1)
        assert [api.predict("m", feed, version=v).status_code for v in (1, 3)] == [200, 200]


def test_a_worker_on_an_empty_database_removes_nothing(serve, data_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """Moving to PostgreSQL, a worker started on the new, empty database with the old data folder: files stay."""
    with serve(run_worker=False) as api:
        for _ in range(2):
            assert api.upload(models.mlp(), "m.onnx").status_code == 202
        artifacts = api.services.settings.artifacts_dir
        for path in artifacts.rglob("*"):
            os.utime(path, (time.time() - 2 * 3600,) * 2)
    elsewhere = Settings(**{**TEST_SETTINGS, "data_dir": data_dir, "run_worker": False,
                            "database_url": f"sqlite:///{tmp_path / 'new.db'}"})
    worker = Worker(elsewhere)
    try:
        assert worker.sweep_orphaned_artifacts() == []
    finally:
        worker.db.dispose()
    assert stored(artifacts) == {("m", 1), ("m", 2)}

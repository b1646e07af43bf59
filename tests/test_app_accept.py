"""An accepted upload appears whole: its version row carries its own serving (batching) settings from the
first commit that makes it visible, on SQLite and on PostgreSQL.

Were the settings written in a second transaction, another replica resolving the name in between would
cache the service's default batching for that version. The test reads the database from its own engine
after every commit the app makes (a SQLAlchemy after_commit hook), so it sees each state another replica
could see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from app.store import Database, ModelVersion
from tests import models

Snapshot = list[tuple[str, int, str, dict[str, Any] | None]]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None: the app's own SQLite file; else a fresh database on the local PostgreSQL (skipped without one)."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("new_database")()


@contextmanager
def _after_every_commit(url: str) -> Iterator[list[Snapshot]]:
    """Collect, after each commit any session in this process makes, the model versions another engine sees."""
    watcher = Database(url)
    snapshots: list[Snapshot] = []

    def snapshot(_session: Session) -> None:
        with watcher.read() as session:
            rows = session.execute(select(ModelVersion.name, ModelVersion.version, ModelVersion.status,
                                          ModelVersion.serving)).all()
        snapshots.append([tuple(row) for row in rows])

    event.listen(Session, "after_commit", snapshot)
    try:
        yield snapshots
    finally:
        event.remove(Session, "after_commit", snapshot)
        watcher.dispose()


def test_a_version_is_never_visible_without_its_serving_settings(serve: Callable[..., Any],  # noqa: ANN001
                                                                 database_url: str | None) -> None:
    sent = {("m", 1): {"batch_max_size": 4, "batch_max_delay_ms": 2.0}, ("m", 2): {"batch_max_size": 1},
            ("plain", 1): None}
    with serve(run_worker=False, database_url=database_url) as api:
        with _after_every_commit(api.services.db.url) as snapshots:
            for (name, _), settings in sent.items():
                fields = {k: str(v) for k, v in (settings or {}).items()}
                assert api.upload(models.mlp(), name=name, **fields).status_code == 202
        seen = {(name, version): serving for snapshot in snapshots for name, version, _, serving in snapshot}
        assert set(seen) == set(sent), seen  # every version was seen by the watcher...
        for snapshot in snapshots:  # ...and never without its settings, in any state of the database
            for name, version, status, serving in snapshot:
                assert serving == sent[(name, version)], (name, version, status, serving)
        assert api.client.get("/v1/models/m/versions/1").json()["batching"] == sent[("m", 1)]

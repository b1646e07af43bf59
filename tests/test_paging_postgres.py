"""Paging, retention and the orphan sweep on PostgreSQL (row locks, GROUP BY ... LIMIT, IN (subquery))."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import test_orphans as orphans
from tests import test_paging as paging
from tests import test_registry_reads as reads
from tests import test_retention as retention


@pytest.fixture
def serve_pg(serve, new_database: Callable[[], str]) -> Callable[..., Any]:  # noqa: ANN001
    url = new_database()
    return lambda **overrides: serve(database_url=url, **overrides)


def test_paging_on_postgres(serve_pg) -> None:  # noqa: ANN001
    paging.test_pages_follow_the_link_header_in_name_order(serve_pg)
    paging.test_a_limit_out_of_range_is_refused(serve_pg)


def test_retention_on_postgres(serve_pg) -> None:  # noqa: ANN001
    retention.test_uploads_delete_versions_beyond_the_newest_but_never_the_serving_or_pinned_one(serve_pg)


def test_worker_start_on_postgres(serve_pg, data_dir: Path) -> None:  # noqa: ANN001
    retention.test_a_worker_applies_the_setting_at_start_to_models_nobody_uploads_to(serve_pg, data_dir)


def test_orphans_on_postgres(serve_pg, data_dir: Path) -> None:  # noqa: ANN001
    orphans.test_a_starting_worker_removes_the_files_of_deleted_and_never_committed_versions(serve_pg, data_dir)


def test_reads_on_postgres(serve_pg) -> None:  # noqa: ANN001
    reads.test_version_lists_carry_no_report_and_the_report_routes_still_answer(serve_pg)

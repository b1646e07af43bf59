"""The dashboard's model list: every model when GET /v1/models answers in pages (more than LIST_CAP models: it
follows X-Next-After; before, it showed the first page only; LIST_CAP is made 2 here so that 5 models take 3 pages),
and back by itself after a failed read (a service restart).

Needs the Debian packages chromium and chromium-driver (skips without them)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import app.api.models as models_api
from app.main import create_app
from app.settings import Settings
from tests import models
from tests.conftest import TEST_SETTINGS
from tests.service import free_port
from tests.test_dashboard import browser, needs_chromium, wait_for  # noqa: F401 - `browser` is a fixture
from tests.test_robust_disconnect import uvicorn_in_thread

NAMES = ["alpha", "bravo", "charlie", "delta", "echo"]


@needs_chromium
def test_every_page_of_models_is_listed(browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001, F811
    monkeypatch.setattr(models_api, "LIST_CAP", 2)
    app = create_app(Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "data", "run_worker": False}))
    with uvicorn_in_thread(app, free_port()) as base, httpx.Client(base_url=base, timeout=60) as api:
        for name in NAMES:
            files = {"file": (f"{name}.onnx", models.mlp().SerializeToString())}
            assert api.post("/v1/models", files=files, data={"name": name}).status_code == 202
        first = api.get("/v1/models")
        assert len(first.json()) == 2 and first.headers["X-Next-After"] == "bravo"  # the API pages
        browser.get(base + "/")
        wait_for(browser, "document.querySelectorAll('#models tbody tr[data-model]').length === 5")
        shown = browser.execute_script(
            "return [...document.querySelectorAll('#models tbody tr[data-model]')].map((r) => r.dataset.model)")
        assert shown == NAMES


@needs_chromium
def test_the_list_comes_back_after_the_service_restarts(browser, tmp_path: Path) -> None:  # noqa: ANN001, F811
    """A failed list read (a restart, a proxy's 502 in a rolling deploy) is tried again; before, the page stopped
    following the service until someone clicked Refresh."""
    settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "data", "run_worker": False})
    port = free_port()
    with uvicorn_in_thread(create_app(settings), port) as base, httpx.Client(base_url=base, timeout=60) as api:
        files = {"file": ("alpha.onnx", models.mlp().SerializeToString())}
        assert api.post("/v1/models", files=files, data={"name": "alpha"}).status_code == 202
        browser.get(base + "/")
        wait_for(browser, "document.querySelectorAll('#models tbody tr[data-model]').length === 1")
    browser.find_element("id", "refresh").click()  # the service is down: the list read fails
    wait_for(browser, "document.querySelector('#models tbody td.error') !== null")
    with uvicorn_in_thread(create_app(settings), port) as base, httpx.Client(base_url=base, timeout=60) as api:
        files = {"file": ("bravo.onnx", models.mlp().SerializeToString())}
        assert api.post("/v1/models", files=files, data={"name": "bravo"}).status_code == 202
        wait_for(browser, "document.querySelectorAll('#models tbody tr[data-model]').length === 2", timeout=40)

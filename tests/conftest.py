"""Fixtures for the service tests: a real app (TestClient) on a fresh data folder, and small helpers."""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests import models

# Small and fast: a short optimizer budget, a short lease so lost jobs are noticed quickly, no
# caching of which version serves (a test asserts right after a job finishes).
TEST_SETTINGS: dict[str, Any] = {
    "providers": "cpu", "intra_op_threads": 1, "worker_poll_s": 0.05, "job_lease_s": 3.0,
    "registry_cache_ttl_s": 0.0, "optimize_time_budget_s": 4.0, "log_level": "warning",
}


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


class Api:
    """A TestClient with the calls the tests repeat."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    @property
    def services(self):  # noqa: ANN201 - app.services.container.Services
        return self.client.app.state.services

    def upload(self, model: onnx.ModelProto | bytes, filename: str = "model.onnx", calibration: bytes | None = None,
               **fields: str):  # noqa: ANN201 - httpx.Response
        data = model if isinstance(model, bytes) else model.SerializeToString()
        files = {"file": (filename, data, "application/octet-stream")}
        if calibration is not None:
            files["calibration"] = ("samples.npz", calibration, "application/octet-stream")
        return self.client.post("/v1/models", files=files, data=fields)

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, until: Callable[[dict], bool] | None = None, timeout: float = 90) -> dict[str, Any]:
        """Poll a job until `until(job)` (default: finished). Fails the test on timeout, showing the job."""
        until = until or (lambda job: job["status"] in ("succeeded", "failed"))
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            assert time.monotonic() < deadline, f"job did not get there in {timeout} s: {job}"
            time.sleep(0.02)

    def predict(self, name: str, feed: dict[str, Any], version: int | None = None, **extra: Any):  # noqa: ANN201
        path = f"/v1/models/{name}" + (f"/versions/{version}" if version is not None else "") + "/predict"
        inputs = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in feed.items()}
        return self.client.post(path, json={"inputs": inputs, **extra})


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a selenium WebDriver
    """One headless Chromium for the whole run: starting one costs 1-2.5 s, and 15 tests each started their own.
    Tests take it through `browser` (tests/test_dashboard.py), which gives each a fresh tab."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    folder = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                "--disable-dev-shm-usage", f"--user-data-dir={folder / 'profile'}", "--window-size=1150,900"):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as env:  # read by chromedriver and Chromium when they start
        env.setenv("SE_OFFLINE", "true")  # selenium-manager must not download anything
        # Chromium writes its crash database (~/.config/chromium) and dconf (~/.cache/dconf) outside --user-data-dir.
        env.setenv("XDG_CONFIG_HOME", str(folder / "config"))
        env.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def serve(data_dir: Path) -> Callable[..., Any]:
    """`with serve(run_worker=False, **settings) as api:` runs the app's lifespan (and worker) around the block."""

    @contextmanager
    def run(**overrides: Any) -> Iterator[Api]:
        settings = Settings(**{"data_dir": data_dir, **TEST_SETTINGS, **overrides})
        with TestClient(create_app(settings)) as client:
            yield Api(client)

    return run


# -- Refused uploads (tests/test_app_upload.py, tests/test_hardening_*.py): one app serving `good` version 1,
# -- a bad upload posted to it, and the check that the refusal changed nothing.


@contextmanager
def serving_good_model(data_dir: Path, **overrides: Any) -> Iterator[Api]:
    """An app without a worker (jobs stay queued) serving models.mlp() as `good` version 1."""
    settings = Settings(**{**TEST_SETTINGS, "data_dir": data_dir, "run_worker": False, **overrides})
    with TestClient(create_app(settings)) as client:
        api = Api(client)
        assert api.upload(models.mlp(), "good.onnx").status_code == 202
        yield api


def post_bad(api: Api, model: bytes, calibration: bytes | None = None, **fields: str):  # noqa: ANN201 - httpx.Response
    """Upload `model` (and `calibration`) as bad.onnx; the test asserts on the answer."""
    return api.upload(model, "bad.onnx", calibration, **fields)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def assert_only_good_serves(api: Api) -> None:
    """A refused upload changed nothing: `good` v1 is the only model and file, no upload is left over, it predicts."""
    listed = api.client.get("/v1/models").json()
    assert [(m["name"], m["versions"], m["latest_version"]) for m in listed] == [("good", 1, 1)]
    settings = api.services.settings
    assert files_under(settings.artifacts_dir) == {"models/good/1/original.onnx"}
    assert not list(settings.uploads_dir.iterdir()), "a refused upload left a temporary file behind"
    response = api.predict("good", models.random_feed(models.mlp(), batch=2))
    assert response.status_code == 200, response.text
    assert len(response.json()["outputs"]["logits"]) == 2


# -- PostgreSQL: one fresh database per use, dropped afterwards -------------------------------------------


ADMIN_URL = os.environ.get("ONNXFORGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="module")
def new_database() -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty PostgreSQL databases (URLs); all are dropped when the module ends."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg (the postgres extra) is not installed")
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {ADMIN_URL} (set ONNXFORGE_TEST_POSTGRES_URL): {exc}")
    created: list[str] = []

    def create() -> str:
        name = f"onnxforge_test_{uuid.uuid4().hex[:12]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return ADMIN_URL.rsplit("/", 1)[0] + "/" + name

    yield create
    for name in created:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()

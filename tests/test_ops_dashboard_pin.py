"""The dashboard shows which version serves and whether it is pinned, and pins / unpins through the public API
(PUT / DELETE /v1/models/{name}/serving), in a real headless Chromium against the real service: a read-only key
is refused with the API's reason, an admin key's pin makes predict serve the pinned version, unpin gives the name
back to the newest ready version. Needs the Debian packages chromium and chromium-driver (skips without them)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np

from tests import hostile, models
from tests.test_dashboard import (  # noqa: F401 - `browser` is a fixture
    browser,
    needs_chromium,
    running_service,
    screenshot_dir,
    shot,
    text,
    wait_for,
)

ADMIN, READ = "dashboard-pin-admin-0123456789", "dashboard-pin-read-0123456789"
MODEL_ROW = "document.querySelector('#models tr[data-model=mlp]')"


def _upload_two_ready_versions(api: httpx.Client) -> None:
    """mlp v1 and v2 (different weights), optimized at fp32 only (the quickest job), both ready."""
    jobs = []
    for seed in (0, 1):
        data = models.mlp(seed=seed).SerializeToString()
        accepted = api.post("/v1/models", files={"file": ("mlp.onnx", data)}, data={"precision": "fp32"})
        assert accepted.status_code == 202, accepted.text
        jobs.append(accepted.json()["status_url"])
    for url in jobs:
        deadline = time.monotonic() + 120
        while (job := api.get(url).json())["status"] not in ("succeeded", "failed") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job["status"] == "succeeded", job


def _use_key(driver, key: str) -> None:  # noqa: ANN001 - a selenium WebDriver, as in tests/test_dashboard.py
    field = driver.find_element("id", "api-key")
    field.clear()
    field.send_keys(key + "\t")
    wait_for(driver, f"sessionStorage.getItem('onnxforge.apiKey') === '{key}'")


def _served_version(api: httpx.Client) -> int:
    features = np.zeros((1, 64), np.float32).tolist()
    answer = api.post("/v1/models/mlp/predict", json={"inputs": {"features": features}})
    assert answer.status_code == 200, answer.text
    return answer.json()["version"]


@needs_chromium
def test_pin_and_unpin_from_the_dashboard_in_chromium(browser, tmp_path: Path) -> None:  # noqa: ANN001, F811
    from selenium.webdriver.support.ui import Select

    shots = screenshot_dir(tmp_path)
    keys = f"admin:{ADMIN},read:{READ}"
    with (
        running_service(tmp_path, api_keys=keys) as base,
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30) as api,
    ):
        _upload_two_ready_versions(api)
        assert _served_version(api) == 2

        browser.get(base + "/")
        _use_key(browser, READ)
        wait_for(browser, MODEL_ROW)
        assert text(browser, "#models tr[data-model=mlp] td:nth-child(4)") == "v2"  # nothing pinned: as before
        browser.find_element("css selector", "#models tr[data-model=mlp]").click()
        wait_for(browser, "document.querySelector('#report-section').dataset.version === '2'")
        assert text(browser, "#serving-text") == "v2 serves: the newest ready version (nothing pinned)."
        assert not browser.find_element("id", "unpin").is_displayed()
        # The graph view names a variant's real node counts (the original's empty `changes` read "undefined").
        wait_for(browser, "document.querySelectorAll('#latency-chart g.bar').length > 0")
        graph = text(browser, "#graph")
        assert "undefined" not in graph and re.search(r"Changes in \w+( \(not served\))?: \d+ → \d+ nodes", graph)

        # Roll back to v1 with the read-only key: refused, and the page says why (the API's own reason).
        Select(browser.find_element("id", "report-version")).select_by_value("1")
        wait_for(browser, "document.querySelector('#report-section').dataset.version === '1'")
        pin = browser.find_element("id", "pin")
        assert pin.is_displayed() and pin.text == "Pin v1 to serve"
        pin.click()
        wait_for(browser, "!document.querySelector('#pin-error').hidden")
        assert text(browser, "#pin-error").startswith("Pin v1 refused: this API key is read-only")
        assert api.get("/v1/models/mlp").json()["pinned_version"] is None

        # With the admin key the pin takes: the API, predict, the models list and the report all say v1.
        _use_key(browser, ADMIN)
        browser.find_element("id", "pin").click()
        wait_for(browser, "document.querySelector('#serving').dataset.pinned === '1'")
        described = api.get("/v1/models/mlp").json()
        assert (described["pinned_version"], described["serving_version"]) == (1, 1)
        assert _served_version(api) == 1
        assert not browser.find_element("id", "pin-error").is_displayed()
        assert text(browser, "#serving-text") == "v1 serves: pinned, so newer versions wait until it is unpinned."
        assert not browser.find_element("id", "pin").is_displayed()  # v1 is the pinned one already
        assert browser.find_element("id", "unpin").is_displayed()
        options = browser.execute_script(
            "return [...document.querySelectorAll('#report-version option')].map(o => o.textContent)"
        )
        assert options == ["v1 (ready, serves, pinned)", "v2 (ready)"]
        wait_for(browser, MODEL_ROW + ".cells[3].textContent === 'v1 pinned'")
        listed = {m["name"]: m for m in api.get("/v1/models").json()}["mlp"]
        assert (listed["serving_version"], listed["pinned_version"]) == (1, 1)
        browser.execute_script("window.scrollTo(0, 0)")
        shot(browser, "#models-section", shots / "dashboard-pinned-models.png")

        # Unpin: the newest ready version serves again.
        browser.find_element("id", "unpin").click()
        wait_for(browser, "document.querySelector('#serving').dataset.pinned === ''")
        described = api.get("/v1/models/mlp").json()
        assert (described["pinned_version"], described["serving_version"]) == (None, 2)
        assert _served_version(api) == 2
        assert text(browser, "#serving-text") == "v2 serves: the newest ready version (nothing pinned)."
        assert not browser.find_element("id", "unpin").is_displayed()
        assert browser.find_element("id", "pin").text == "Pin v1 to serve"  # v1 is still the version shown
        wait_for(browser, MODEL_ROW + ".cells[3].textContent === 'v2'")


@needs_chromium
def test_a_failed_only_version_says_it_serves_its_original_in_chromium(browser, tmp_path: Path) -> None:  # noqa: ANN001, F811
    # As in tests/test_dashboard.py: a model whose run never ends fails its job under a 0.3 s limit.
    (tmp_path / "mlp.onnx").write_bytes(hostile.model_that_hangs().SerializeToString())
    with running_service(tmp_path, job_time_limit_s=0.3) as base:
        browser.get(base + "/")
        wait_for(browser, "!document.querySelector('#models-empty').hidden")
        browser.find_element("css selector", "input[name=file]").send_keys(str(tmp_path / "mlp.onnx"))
        browser.find_element("css selector", "#upload button[type=submit]").click()
        wait_for(browser, "!document.querySelector('#report-failed').hidden")
        assert httpx.get(f"{base}/v1/models/mlp").json()["versions"][0]["status"] == "failed"
        assert (
            text(browser, "#serving-text") == "v1 serves its validated original: no version is ready (nothing pinned)."
        )
        assert browser.find_element("id", "pin").text == "Pin v1 to serve"  # a failed version can be pinned

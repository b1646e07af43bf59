"""The dashboard at `/`: served without a key (TestClient), and driven in a real headless Chromium against the
real service (uvicorn + worker): upload, live job, report numbers equal the API's, "try it", a failed job.

The browser tests need the Debian packages `chromium` and `chromium-driver` (.ci/run installs them) and skip
without them. Screenshots go to the test's tmp folder, or to $DASHBOARD_SCREENSHOTS (e.g. docs) when set.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest

from tests import hostile, models, service
from tests.conftest import CHROMEDRIVER, CHROMIUM, npz

KEY = "dashboard-test-key-0123456789"


# -- without a browser ----------------------------------------------------------------------------


def test_page_and_assets_load_without_a_key_while_the_api_needs_one(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, api_keys=f"admin:{KEY}") as api:
        page = api.client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
        assert sorted(assets) == ["/static/dashboard.css", "/static/dashboard.js"]
        for path in assets:
            asset = api.client.get(path)
            assert asset.status_code == 200 and len(asset.content) > 500, path
            # Works offline: nothing is fetched from another host (the SVG namespace is a name, not a fetch).
            assert re.findall(r"https?://(?!www\.w3\.org/2000/svg)", asset.text) == [], path
        assert api.client.get("/v1/models").status_code == 401
        assert api.client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize(("field", "value", "message"), [
    ("min_cosine", "1.5", "min_cosine must be between 0 and 1"),
    ("min_top1", "most", "min_top1 must be a number between 0 and 1"),
])
def test_upload_refuses_a_tolerance_outside_0_to_1(serve, field: str, value: str, message: str) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        refused = api.upload(models.mlp(), **{field: value})
        assert refused.status_code == 400 and message in refused.json()["error"], refused.text


# -- in Chromium ----------------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)",
)


@contextmanager
def running_service(tmp_path: Path, **settings: Any) -> Iterator[str]:  # noqa: ANN401
    """The service (API and worker) on a free port of 127.0.0.1; yields its base URL."""
    with service.running_service(tmp_path, **settings) as (base, _):
        yield base


@pytest.fixture
def browser(chromium):  # noqa: ANN001, ANN201 - a selenium WebDriver
    """The run's Chromium (conftest.chromium) in a fresh tab, as a new browser shows a page: its own sessionStorage
    (where the page keeps the API key), no alert, 1150x900; the previous test's tab, and what polls in it, is closed."""
    from selenium.common.exceptions import NoAlertPresentException

    old = chromium.window_handles
    chromium.switch_to.new_window("tab")
    fresh = chromium.current_window_handle
    for handle in old:
        chromium.switch_to.window(handle)
        with suppress(NoAlertPresentException):
            chromium.switch_to.alert.dismiss()
        chromium.close()
    chromium.switch_to.window(fresh)
    chromium.set_window_size(1150, 900)
    chromium.set_script_timeout(30)
    return chromium


def screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("DASHBOARD_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for(driver, script: str, timeout: float = 90) -> Any:  # noqa: ANN001, ANN401
    """Poll a JavaScript expression until it is truthy; fail showing the page's job/report text."""
    deadline = time.monotonic() + timeout
    while not (value := driver.execute_script("return " + script)):
        if time.monotonic() > deadline:
            shown = driver.execute_script("return document.querySelector('main').innerText")
            pytest.fail(f"the page never got to `{script}`; it shows:\n{shown[:2000]}")
        time.sleep(0.1)
    return value


def to_fixed(x: float, digits: int) -> str:
    """JavaScript's x.toFixed(digits) for x >= 0: an exact tie rounds up (Python's format rounds 1.125 to '1.12',
    the page shows 1.13; the report's figures are rounded to 3-4 decimals, so ties like 1.125 happen)."""
    return str(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def served_speedup(report: dict) -> str:
    """The speed-up the page shows for what serves: the confirmation's paired figure with its interval."""
    paired = report["speedup_paired"]
    if report["selected"] == report["baseline"]:
        return "1.00x (original)"
    if paired is None:
        return to_fixed(report["speedup_p50"], 2) + "x (p50s)"
    return f"{to_fixed(paired['median'], 2)}x [{to_fixed(paired['low'], 2)}–{to_fixed(paired['high'], 2)}]"


def text(driver, selector: str) -> str:  # noqa: ANN001
    return driver.find_element("css selector", selector).text


def shot(driver, selector: str, path: Path, scale: float = 0.8) -> None:  # noqa: ANN001
    """Screenshot one element, whole even when taller than the window, scaled down to keep the PNG small."""
    box = driver.execute_script("const r = document.querySelector(arguments[0]).getBoundingClientRect();"
                                "return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}",
                                selector)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True, "clip": {**box, "scale": scale}})
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@needs_chromium
def test_upload_watch_report_and_try_it_in_chromium(browser, tmp_path: Path) -> None:  # noqa: ANN001
    shots = screenshot_dir(tmp_path)
    model = models.cnn()
    (tmp_path / "cnn.onnx").write_bytes(model.SerializeToString())
    samples = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    (tmp_path / "images.npz").write_bytes(npz(image=samples))
    auth = {"Authorization": f"Bearer {KEY}"}
    with running_service(tmp_path, api_keys=f"admin:{KEY}") as base, httpx.Client(base_url=base, headers=auth) as api:
        browser.get(base + "/")
        # Without the key the API refuses, and the page says what to do.
        assert "API key" in wait_for(browser, "document.querySelector('#models td.error')?.innerText")
        browser.find_element("id", "api-key").send_keys(KEY + "\t")
        wait_for(browser, "!document.querySelector('#models-empty').hidden")
        assert browser.execute_script("return sessionStorage.getItem('onnxforge.apiKey')") == KEY

        browser.find_element("css selector", "input[name=file]").send_keys(str(tmp_path / "cnn.onnx"))
        browser.find_element("css selector", "input[name=calibration]").send_keys(str(tmp_path / "images.npz"))
        browser.find_element("css selector", "input[name=min_cosine]").send_keys("0.97")
        browser.execute_script(  # record every job line the page shows
            "window.jobLines = []; new MutationObserver(() => window.jobLines.push("
            "document.querySelector('#job-text').textContent)).observe(document.querySelector('#job-text'),"
            " {childList: true, characterData: true, subtree: true})")
        browser.find_element("css selector", "#upload button[type=submit]").click()
        assert wait_for(browser, "['succeeded','failed'].includes(document.querySelector('#job').dataset.status)"
                                 " && document.querySelector('#job').dataset.status") == "succeeded"
        # The job's stage and progress showed while it ran (the optimizer takes seconds; the page polls at 2/s).
        lines = browser.execute_script("return window.jobLines")
        assert any(re.fullmatch(r"cnn v1: running, stage \w+ \(\d+%\)", line) for line in lines), lines
        assert lines[-1] == "cnn v1: succeeded (100%)", lines  # a finished job has no stage
        wait_for(browser, "document.querySelectorAll('#latency-chart g.bar').length > 0")

        report = api.get("/v1/models/cnn/versions/1/report").json()["report"]
        assert report["config"]["min_cosine"] == 0.97  # the form's tolerance reached the optimizer
        timed = {v["name"]: v["latency_ms"] for v in report["variants"] if v.get("latency_ms")}
        bars = browser.execute_script(
            "return [...document.querySelectorAll('#latency-chart g.bar')].map(g => ({name: g.dataset.variant,"
            " p50: +g.dataset.p50, p90: +g.dataset.p90, p99: +g.dataset.p99, label: g.querySelector('.value')"
            ".textContent, width: +g.querySelector('rect').getAttribute('width')}))")
        assert [b["name"] for b in bars] == list(timed)  # baseline and every timed candidate, in report order
        for bar in bars:
            latency = timed[bar["name"]]
            assert (bar["p50"], bar["p90"], bar["p99"]) == (latency["p50"], latency["p90"], latency["p99"])
            assert bar["label"].startswith(f"p50 {to_fixed(latency['p50'], 3)} ms")
        # Bars are drawn to scale: the same width per ms of p50 for every bar. (Was: the fastest's bar narrower than
        # the slowest's, which failed when a loaded host's auto run timed the original alone: one bar, both names.)
        per_ms = [bar["width"] / timed[bar["name"]]["p50"] for bar in bars]
        assert max(per_ms) == pytest.approx(min(per_ms), rel=1e-9), bars
        sizes = browser.execute_script("return [...document.querySelectorAll('#size-chart g.bar')]"
                                       ".map(g => [g.dataset.variant, +g.dataset.value])")
        assert sizes == [[v["name"], v["size_bytes"]] for v in report["variants"] if v.get("size_bytes") is not None]

        assert text(browser, "[data-field='Speed-up'] b") == served_speedup(report)
        assert text(browser, "[data-field='Size ratio'] b") == to_fixed(report["size_ratio"], 2)
        assert text(browser, "[data-field='Serves'] b") == report["selected"]
        assert text(browser, "#selection-reason") == "Why: " + report["selection_reason"]
        rejected = [f"{v['name']}: {v['reason']}" for v in report["variants"] if v["status"] != "ok"]
        assert browser.execute_script("return [...document.querySelectorAll('#rejected li')]"
                                      ".map(li => li.textContent)") == rejected
        assert "cosine ≥ 0.970" in text(browser, "#tolerance")
        checked = [(v["name"], out) for v in report["variants"] if v.get("accuracy")
                   for out in v["accuracy"]["outputs"]]
        assert len(browser.find_elements("css selector", "#accuracy tbody tr")) == len(checked) > 0
        before, after = report["graph"]["before"], report["graph"]["after"]
        assert f"Nodes: {before['node_count']} before, {after['node_count']} after" in text(browser, "#graph")
        histogram = browser.execute_script("return [...document.querySelectorAll('#op-histogram tr')].slice(1)"
                                           ".map(r => [...r.cells].map(c => c.textContent))")
        assert {op: (int(b), int(a)) for op, b, a in histogram} == {
            op: (before["op_histogram"].get(op, 0), after["op_histogram"].get(op, 0))
            for op in {*before["op_histogram"], *after["op_histogram"]}}
        # "after" is the served model: the fused one (BN folded into Conv) unless fusing measured within the 3% noise
        # margin of the original on this loaded machine, in which case the original serves and nothing is folded.
        folded = "0" if report["selected"] != "original" else "2"
        assert histogram and ("BatchNormalization", "2", folded) in {tuple(r) for r in histogram}

        anchor = browser.find_element("id", "download")
        served = "the original: nothing beat it" if report["selected"] == "original" else report["selected"]
        assert anchor.text == f"Download the served model ({served})"
        link = anchor.get_attribute("href")
        downloaded = api.get(link)
        assert downloaded.status_code == 200
        onnx.checker.check_model(onnx.load_from_string(downloaded.content))

        # The models list shows the same speedup and size ratio.
        row = browser.execute_script("return [...document.querySelector('#models tr[data-model=cnn]').cells]"
                                     ".map(c => c.textContent)")
        variant = "original" if report["selected"] == "original" else "optimized"
        assert row == ["cnn", "1", "ready", "v1", variant, "cpu", served_speedup(report),
                       to_fixed(report["size_ratio"], 2)]

        # Try it: one predict with the generated example; the answer shown is the API's answer.
        browser.find_element("id", "try-send").click()
        wait_for(browser, "document.querySelector('#try-latency').dataset.ms")
        assert re.fullmatch(rf"v1 \({variant}\) answered in [\d.]+ ms \(round trip from this browser\)",
                            text(browser, "#try-latency"))
        feed = json.loads(browser.execute_script("return document.querySelector('#try-input').value"))
        assert np.asarray(feed["inputs"]["image"]).shape == (1, 3, 32, 32)  # "batch" became 1
        shown = json.loads(browser.execute_script("return document.querySelector('#try-output').textContent"))
        expected = api.post("/v1/models/cnn/predict", json=feed).json()["outputs"]
        np.testing.assert_allclose(shown["logits"], expected["logits"], rtol=1e-5, atol=1e-6)

        browser.execute_script("window.scrollTo(0, 0)")
        shot(browser, "#models-section", shots / "dashboard-models.png")
        shot(browser, "#report-section", shots / "dashboard-report.png")


@needs_chromium
def test_a_failed_job_shows_its_reason_in_chromium(browser, tmp_path: Path) -> None:  # noqa: ANN001
    shots = screenshot_dir(tmp_path)
    # A model whose run never ends under a short time limit: the worker stops the job and fails it with the reason
    # (an MLP under 0.3 s once finished in time in CI).
    (tmp_path / "mlp.onnx").write_bytes(hostile.model_that_hangs().SerializeToString())
    with running_service(tmp_path, job_time_limit_s=0.3) as base:
        browser.get(base + "/")
        wait_for(browser, "!document.querySelector('#models-empty').hidden")
        browser.find_element("css selector", "input[name=file]").send_keys(str(tmp_path / "mlp.onnx"))
        browser.find_element("css selector", "#upload button[type=submit]").click()
        wait_for(browser, "document.querySelector('#job').dataset.status === 'failed'")
        job = httpx.get(f"{base}/v1/models/mlp").json()["versions"][0]["job"]
        assert job["status"] == "failed" and "time limit of 0.3 s" in job["error"]
        assert text(browser, "#job-error").startswith(f"Optimization failed: {job['error']}")
        assert "keeps serving" in text(browser, "#job-error")
        wait_for(browser, "!document.querySelector('#report-failed').hidden")
        assert text(browser, "#report-failed") == f"Version 1 failed to optimize: {job['error']}"
        assert text(browser, "#models tr[data-model=mlp] td:nth-child(3)") == "failed"
        assert browser.find_element("id", "try").is_displayed()  # its original still serves: "try it" stays
        browser.execute_script("window.scrollTo(0, 0)")
        shot(browser, "main", shots / "dashboard-failed.png")


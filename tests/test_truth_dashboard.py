"""The dashboard shows the figures the service proves, in a real headless Chromium against the real service.

A user review found: the models table and report card showed "Speedup p50" (a selection-run p50 ratio) where the
service proves `speedup_paired`; the accuracy panel's header read the cosine/top-1 defaults for an output gated on
`mask:0.3` (its row: cosine 0.9759 "within tolerance", no mask figure); the graph panel called the served INT8 graph
"the FP32 graph after cleanup and fusion" and said "Fusions applied: none" for a fused model; long variant names
were cut off in the charts; the upload form lacked fields the API takes, and "Uploading…" stayed after a refusal.
Needs the Debian packages chromium and chromium-driver (skips without them), as tests/test_dashboard.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.conftest import npz
from tests.models import GraphBuilder
from tests.test_dashboard import (  # noqa: F401 - `browser` is a fixture
    browser,
    needs_chromium,
    running_service,
    text,
    wait_for,
)

NUMBER = re.compile(r"\d+(?:\.\d+)?")


def segmenter(seed: int = 0, image: int = 48, channels: int = 48) -> onnx.ModelProto:
    """Conv-BatchNorm-Relu, two Conv-Relu, then a 1x1 Conv and a Sigmoid: a probability map [batch,1,H,W] like a text
    detector's. Heavy enough that static INT8 usually serves (2.6x confirmed under load 7), so both the served-variant
    and the served-original branches of the page get run; each is asserted on its own."""
    b = GraphBuilder(seed)
    x = b.op("Conv", ["image", b.weight(channels, 3, 3, 3), b.weight(channels, scale=0.1)], pads=[1, 1, 1, 1])
    stats = [
        b.rng.uniform(0.5, 1.5, channels),
        b.rng.normal(0, 0.1, channels),
        b.rng.normal(0, 0.1, channels),
        b.rng.uniform(0.5, 1.5, channels),
    ]
    x = b.op("BatchNormalization", [x, *(b.const(s.astype(np.float32)) for s in stats)], epsilon=1e-5)
    x = b.op("Relu", [x])
    for _ in range(2):
        x = b.op("Conv", [x, b.weight(channels, channels, 3, 3), b.weight(channels, scale=0.1)], pads=[1, 1, 1, 1])
        x = b.op("Relu", [x])
    x = b.op("Conv", [x, b.weight(1, channels, 1, 1, scale=1.0), b.weight(1, scale=0.1)])
    x = b.op("Sigmoid", [x])
    b.rename_output(x, "maps")
    return b.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["batch", 1, image, image])],
        "segmenter",
    )


def numbers(shown: str) -> list[float]:
    return [float(n) for n in NUMBER.findall(shown)]


def assert_ratio_shown(shown: str, ratio: dict[str, float]) -> None:
    """`shown` is "median x [low–high]" of `ratio` (compared as numbers: the page rounds with toFixed)."""
    assert numbers(shown)[:3] == pytest.approx([ratio["median"], ratio["low"], ratio["high"]], abs=0.0051), shown


def fill(driver, field: str, value: str) -> None:  # noqa: ANN001 - a selenium WebDriver
    element = driver.find_element("css selector", f"#upload [name={field}]")
    if element.tag_name == "select":
        from selenium.webdriver.support.ui import Select

        Select(element).select_by_value(value)
    else:
        element.clear()
        element.send_keys(value)


def submit_and_wait(driver) -> str:  # noqa: ANN001
    driver.find_element("css selector", "#upload button[type=submit]").click()
    return wait_for(
        driver,
        "['succeeded','failed'].includes(document.querySelector('#job').dataset.status)"
        " && document.querySelector('#job').dataset.status",
        timeout=180,
    )


@needs_chromium
def test_a_mask_gated_upload_from_the_form_shows_the_proven_figures(browser, tmp_path: Path) -> None:  # noqa: ANN001, F811
    model = segmenter()
    (tmp_path / "seg.onnx").write_bytes(model.SerializeToString())
    images = np.random.default_rng(0).normal(size=(20, 3, 48, 48)).astype(np.float32)
    (tmp_path / "images.npz").write_bytes(npz(image=images))
    with running_service(tmp_path) as base:
        browser.get(base + "/")
        wait_for(browser, "!document.querySelector('#models-empty').hidden")
        browser.find_element("css selector", "input[name=file]").send_keys(str(tmp_path / "seg.onnx"))
        browser.find_element("css selector", "input[name=calibration]").send_keys(str(tmp_path / "images.npz"))
        fill(browser, "precision", "int8")
        fill(browser, "int8_mode", "static")
        fill(browser, "calibration_method", "percentile")
        fill(browser, "metrics", json.dumps({"maps": "mask:0.5"}))
        fill(browser, "min_top1", "0.8")
        fill(browser, "batch_max_size", "4")
        assert submit_and_wait(browser) == "succeeded", text(browser, "#job")
        wait_for(browser, "document.querySelectorAll('#accuracy tbody tr[data-variant]').length > 0")

        r = httpx.get(f"{base}/v1/models/seg/versions/1/report").json()["report"]
        cfg = r["config"]  # every form field reached the optimizer
        assert (cfg["precision"], cfg["int8_mode"], cfg["calibration_method"]) == ("int8", "static", "percentile")
        assert (cfg["metrics"], cfg["min_top1"]) == ({"maps": "mask:0.5"}, 0.8)
        variants = {v["name"]: v for v in r["variants"]}

        # 1. The speed-up shown for what serves is the confirmed paired one, with its interval; never speedup_p50.
        card = text(browser, "[data-field='Speed-up'] b")
        listed = text(browser, "#models tr[data-model=seg] td:nth-child(7)")
        if r["selected"] == r["baseline"]:
            assert card == listed == "1.00x (original)"
        else:
            assert_ratio_shown(card, r["speedup_paired"])
            assert_ratio_shown(listed, r["speedup_paired"])
            assert f"{r['speedup_paired']['rounds']} paired rounds" in text(browser, "[data-field='Speed-up'] small")
        labels = browser.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('#latency-chart "
            "g.bar')].map(g => [g.dataset.variant, g.querySelector('.value').textContent]))"
        )
        for name, label in labels.items():  # each bar: its own paired figure from the same run
            paired = variants[name]["latency_by_batch"]["1"].get("speedup_vs_original")
            if name == r["baseline"]:
                assert label.endswith(", 1.00x"), label
            elif paired:
                assert_ratio_shown(label.split(", ", 1)[1], paired)

        # 2. Each output's row says what gated it (the mask's figure), its value and the limit; notes are shown.
        assert "maps: mask:0.5" in text(browser, "#tolerance") and "0.800" in text(browser, "#tolerance")
        assert "cosine" not in text(browser, "#tolerance")  # the only output is gated on its mask
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#accuracy tbody tr[data-variant]')].map(tr => ({variant: "
            "tr.dataset.variant, metric: tr.dataset.metric, gates: [...tr.querySelectorAll('ul.gates li')].map(li => "
            "[li.dataset.value, li.dataset.limit, li.className]), verdict: tr.cells[3].textContent, "
            "other: tr.cells[4].textContent}))"
        )
        checked = [(name, v["accuracy"]["outputs"]["maps"]) for name, v in variants.items() if v.get("accuracy")]
        assert [row["variant"] for row in rows] == [name for name, _ in checked] and rows
        for row, (_, out) in zip(rows, checked, strict=True):
            assert out["metric"] == row["metric"] == "mask:0.5"
            gated = out["mask_iou"] if out.get("mask_iou") is not None else out["mask_agreement"]
            [(value, limit, cls)] = row["gates"]
            assert numbers(value) == pytest.approx([gated * 100], abs=0.0051) and limit == "≥ 80.00%"
            assert (cls == "fail") == (gated < 0.8)
            assert row["verdict"] == ("within tolerance" if out["passed"] else "outside tolerance")
            assert row["other"].startswith("cosine ")  # measured and shown, but not what gated it
            assert numbers(row["other"])[0] == pytest.approx(out["cosine"], abs=0.000051)
        notes = browser.execute_script(
            "return [...document.querySelectorAll('#accuracy-notes li')].map(li => li.textContent)"
        )
        assert notes == r["accuracy_notes"]

        # 3. The graph panel says what "after" is and shows the fusion that made the served graph.
        before, after = r["graph"]["before"], r["graph"]["after"]
        nodes = text(browser, "#graph-nodes")
        assert nodes.startswith(
            f"Nodes: {before['node_count']} before, {after['node_count']} after (before: the uploaded model; "
        )
        served = variants[r["selected"]]
        if r["selected"] != r["baseline"]:
            assert f"after: {r['selected']}, the served variant ({served['precision']})" in nodes
            assert "FP32 graph after cleanup" not in text(browser, "#graph")
        fused = variants["fused"]["changes"]
        step = text(browser, "#changes > li[data-variant=fused]")
        assert step.startswith(
            f"Changes in fused{' (not served)' if r['selected'] == r['baseline'] else ''}: "
            f"{fused['nodes_before']} → {fused['nodes_after']} nodes"
        )
        assert "Nodes removed: BatchNormalization ×1" in step  # folded into the Conv: not "none"
        if r["selected"] not in (r["baseline"], "fused"):
            quantized = ", ".join(f"{op} ×{n}" for op, n in served["changes"]["quantized_ops"].items())
            assert f"Quantized ops: {quantized}" in text(browser, f"#changes > li[data-variant='{r['selected']}']")


def _chart_fits(driver, make: str) -> list[dict[str, Any]]:  # noqa: ANN001
    """Draw a chart with the page's own code and return where each name and value text lies in its SVG."""
    return driver.execute_script(
        f"const chart = {make}; document.querySelector('main').appendChild(chart);"
        "const width = +chart.getAttribute('width');"
        "const out = [...chart.querySelectorAll('g.bar')].map(g => { const n = g.querySelector('text.name').getBBox(),"
        " v = g.querySelector('text.value').getBBox(); return {name: g.dataset.variant, left: n.x,"
        " right: v.x + v.width, width}; }); chart.remove(); return out;"
    )


@needs_chromium
def test_a_refused_upload_clears_uploading_and_long_names_fit_the_charts(browser, tmp_path: Path) -> None:  # noqa: ANN001, F811
    (tmp_path / "seg.onnx").write_bytes(segmenter().SerializeToString())
    with running_service(tmp_path) as base:
        browser.get(base + "/")
        wait_for(browser, "!document.querySelector('#models-empty').hidden")
        browser.find_element("css selector", "input[name=file]").send_keys(str(tmp_path / "seg.onnx"))
        for metrics, reason in (
            (json.dumps({"scores": "mask:0.5"}), "metrics names outputs the model does not have"),
            ("maps: mask", "metrics must be a JSON object"),
        ):
            fill(browser, "metrics", metrics)
            assert submit_and_wait(browser) == "failed"
            assert text(browser, "#job-error").startswith("The upload was refused: ")
            assert reason in text(browser, "#job-error")
            assert text(browser, "#job-text") == ""  # no "Uploading…" left behind
            assert browser.find_element("css selector", "#upload button[type=submit]").is_enabled()
        assert httpx.get(f"{base}/v1/models").json() == []

        long = "int8-static-minmax-qoperator-u8s8-heavy-repair-greedy2"
        report = "{selected: 'x', baseline: 'original', noise: {batch: 1}, variants: []}"
        timed = (
            f"[{{name: 'original', status: 'ok', latency_ms: {{p50: 10, p90: 20, p99: 300}}}}, {{name: '{long}',"
            " status: 'ok', latency_ms: {p50: 4, p90: 5, p99: 6}, latency_by_batch: {'1': {speedup_vs_original:"
            " {median: 2.5, low: 2.25, high: 2.75, rounds: 40}}}}]"
        )
        for bars in (
            _chart_fits(
                browser,
                f"barChart([{{name: '{long}', value: 2e6, label: '2.00 MB', mark: 'ok'}},"
                " {name: 'original', value: 4e6, label: '4.00 MB', mark: 'baseline'}], 'size')",
            ),
            _chart_fits(browser, f"latencyChart({timed}, {report})"),
        ):
            for bar in bars:
                assert bar["left"] >= 0 and bar["right"] <= bar["width"], bars

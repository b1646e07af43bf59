"""The CLI's table and summary say the speed-up the service proves (paired rounds), not a ratio of two p50s.

A review found `fused 1.42x pass` in the table, then `selected: original (... proven 1.03x ...)` below it: the table
divided two p50s timed apart, the decision used paired rounds. Each row now shows its own paired figure from the
report (`latency_by_batch[batch].speedup_vs_original`) and the summary the served one's confirmed figure
(`speedup_paired`); the accuracy column shows what each output was gated on (a mask's IoU, not the cosine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimizer.pipeline import OptimizeConfig, optimize
from optimizer.report_table import summary, variants_table
from tests import models


def _row(table: str, name: str) -> str:
    return next(line for line in table.splitlines() if line[1:].split() and line[1:].split()[0] == name)


def _ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.2f}x [{r['low']:.2f}-{r['high']:.2f}]"


def test_every_row_and_the_served_line_show_the_reports_paired_figures(tmp_path: Path) -> None:
    model = models.cnn()
    config = OptimizeConfig(
        precision="int8", int8_mode="dynamic", benchmark_seconds=0.3, batch_sizes=(1,), min_cosine=0.9, min_top1=0.5
    )
    report = optimize(model.SerializeToString(), out_dir=tmp_path, config=config).report
    text = summary(report)
    timed = [v for v in report["variants"] if v["name"] != "original" and v.get("latency_ms")]
    assert timed, text
    for v in timed:
        paired = v["latency_by_batch"]["1"]["speedup_vs_original"]
        assert _ratio(paired) in _row(text, v["name"]), text
    assert "1.00x" in _row(text, "original")
    served = next(line for line in text.splitlines() if line.startswith("served speed-up:"))
    if report["selected"] == "original":
        assert served.startswith("served speed-up: 1.00x (the original serves)"), served
    else:
        p = report["speedup_paired"]
        assert served.startswith(
            f"served speed-up: {p['median']:.2f}x the original [95%: {p['low']:.2f}-"
            f"{p['high']:.2f}, {p['rounds']} paired rounds"
        ), served


def _variant(name: str, p50: float, paired: dict[str, Any] | None, accuracy: dict[str, Any] | None) -> dict[str, Any]:
    batch: dict[str, Any] = {"runs": 30}
    if paired:
        batch["speedup_vs_original"] = paired
    return {
        "name": name,
        "status": "ok",
        "reason": None,
        "size_bytes": 4096,
        "node_count": 9,
        "latency_ms": {"p50": p50, "p90": p50 * 2, "p99": p50 * 3},
        "latency_by_batch": {"1": batch},
        "accuracy": accuracy,
    }


def test_a_fast_looking_p50_that_the_paired_rounds_do_not_prove_is_not_shown() -> None:
    # The review's case: fused 1.42x by p50s (10.0 / 7.04 ms), its paired rounds 1.02x [0.97-1.08]: the original
    # serves, and the confirmation of another variant failed.
    mask = {
        "passed": True,
        "outputs": {
            "maps": {
                "checked": True,
                "metric": "mask:0.3",
                "cosine": 0.9759,
                "mask_iou": 0.9912,
                "mask_agreement": 0.9990,
                "passed": True,
            }
        },
    }
    report = {
        "baseline": "original",
        "selected": "original",
        "provider": "cpu",
        "noise": {"batch": 1},
        "calibration": {"synthetic": True},
        "selection_reason": "no variant was proven faster",
        "size_ratio": 1.0,
        "speedup_p50": 1.0,
        "speedup_paired": None,
        "confirmation": {"variant": "int8", "speedup": {"median": 1.01, "low": 0.95, "high": 1.07, "rounds": 30}},
        "variants": [
            _variant("original", 10.0, None, None),
            _variant("fused", 7.04, {"median": 1.02, "low": 0.97, "high": 1.08, "rounds": 30}, mask),
        ],
    }
    table = variants_table(report)
    assert "1.42x" not in table
    assert "1.02x [0.97-1.08]" in _row(table, "fused")
    # the mask output was gated on its worst sample's IoU: that is the figure shown, not the cosine
    assert _row(table, "fused").endswith("pass mask:0.3 IoU 0.9912"), table
    served = next(line for line in summary(report).splitlines() if line.startswith("served speed-up:"))
    assert served.startswith(
        "served speed-up: 1.00x (the original serves) (int8 measured 1.01x [0.95-1.07] when timed again: not confirmed)"
    ), served


def test_the_served_line_is_the_confirmed_figure_not_the_selection_runs() -> None:
    # MiniLM in the review: chosen at 2.10x [2.08-2.20] (the selection run's best draw), confirmed at 2.04x.
    selection = {"median": 2.0996, "low": 2.081, "high": 2.2038, "rounds": 42}
    confirmed = {"median": 2.0359, "low": 1.9908, "high": 2.0671, "rounds": 34}
    report = {
        "baseline": "original",
        "selected": "int8",
        "provider": "cpu",
        "noise": {"batch": 1},
        "calibration": {"synthetic": True},
        "selection_reason": "",
        "size_ratio": 0.27,
        "speedup_p50": 2.113,
        "speedup_paired": confirmed,
        "speedup_selection": selection,
        "variants": [_variant("original", 17.0, None, None), _variant("int8", 8.05, selection, None)],
    }
    text = summary(report)
    assert "2.10x [2.08-2.20]" in _row(text, "int8")  # the row: the same run as every other row
    served = next(line for line in text.splitlines() if line.startswith("served speed-up:"))
    assert served.startswith("served speed-up: 2.04x the original [95%: 1.99-2.07, 34 paired rounds"), served
    assert "2.11" not in text  # speedup_p50

"""Render an optimization report as a plain-text table a person can read in a terminal."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def _accuracy(variant: dict[str, Any]) -> str:
    accuracy = variant.get("accuracy")
    if not accuracy:
        return "-"
    cosines = [o.get("cosine") for o in accuracy.get("outputs", {}).values() if o.get("cosine") is not None]
    worst = f"cos {min(cosines):.4f}" if cosines else ""
    return f"{'pass' if accuracy.get('passed') else 'FAIL'} {worst}".strip()


def variants_table(report: dict[str, Any]) -> str:
    """One line per variant: status, size, nodes, p50/p90/p99 and the runs they come from, ratio to the baseline,
    accuracy. The runs are shown because the timing stops after ~2 s: a p99 of 20 runs is their maximum."""
    rows = report["variants"]
    base = next((v for v in rows if v["name"] == report["baseline"]), None)
    base_p50 = base["latency_ms"]["p50"] if base and base.get("latency_ms") else None
    # As wide as the longest name: auto's names (int8-static-minmax-qoperator-u8s8-heavy-repair-greedy2)
    # overflowed a fixed width and pushed every column after them out of line.
    width = max([len("variant") - 1, *(len(v["name"]) for v in rows)]) + 1
    header = f"{'variant':{width + 1}} {'status':9} {'size KiB':>9} {'nodes':>6} {'p50 ms':>9} {'p90 ms':>9} " \
             f"{'p99 ms':>9} {'runs':>5} {'speedup':>8}  accuracy"
    lines = [header, "-" * len(header)]
    for v in rows:
        lat = v.get("latency_ms") or {}
        ratio = f"{base_p50 / lat['p50']:.2f}x" if base_p50 and lat.get("p50") else "-"
        mark = "*" if v["name"] == report["selected"] else " "
        size = v["size_bytes"] / 1024 if v.get("size_bytes") else None
        runs = ((v.get("latency_by_batch") or {}).get("1") or {}).get("runs") if lat else None
        lines.append(
            f"{mark}{v['name']:{width}} {v['status']:9} {_fmt(size, '9.1f'):>9} {_fmt(v.get('node_count')):>6} "
            f"{_fmt(lat.get('p50'), '9.3f'):>9} {_fmt(lat.get('p90'), '9.3f'):>9} {_fmt(lat.get('p99'), '9.3f'):>9} "
            f"{_fmt(runs):>5} {ratio:>8}  {_accuracy(v)}"
        )
        if v.get("reason"):
            lines.append(f"{'':{width + 3}}{v['reason'][:200]}")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    """The table plus the decision, the provider and the calibration used."""
    calibration = report.get("calibration", {})
    data = "synthetic inputs" if calibration.get("synthetic") else (
        f"{calibration.get('samples')} calibration + {calibration.get('holdout_samples')} held-back samples")
    lines = [
        variants_table(report),
        "",
        f"provider: {report['provider']}   accuracy data: {data}",
        f"selected: {report['selected']} ({report.get('selection_reason', '')})",
        f"speedup p50: {_fmt(report.get('speedup_p50'))}x   size ratio: {_fmt(report.get('size_ratio'))}",
    ]
    lines += [f"note: {note}" for note in report.get("accuracy_notes", [])]
    return "\n".join(lines)

"""Render an optimization report as a plain-text table a person can read in a terminal."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def gate(output: dict[str, Any]) -> str:
    """What an output was gated on and its value: "cos 0.9955", "top1 99.5%", "exact 100.00%" (a string or bool
    output), "mask:0.3 IoU 0.9712". A mask gates on its worst sample's IoU (reports before that gated on the share of
    agreeing positions: shown as "agree")."""
    metric = output.get("metric") or "default"
    if metric.startswith("mask:"):
        if output.get("mask_iou") is not None:
            return f"{metric} IoU {output['mask_iou']:.4f}"
        return f"{metric} agree {_fmt(output.get('mask_agreement'), '.2%')}"
    if metric in ("top1", "exact") and output.get("top1") is not None:  # exact: the share of equal values
        return f"{metric} {output['top1']:.2%}"
    return f"cos {output['cosine']:.4f}" if output.get("cosine") is not None else metric


def _accuracy(variant: dict[str, Any]) -> str:
    """pass/FAIL/unproven and, per checked output, the figure it was gated on (not always the cosine: see `gate`).
    "unproven" is the report's `accuracy.unproven`: it failed only because its held-back samples are too few to
    prove the top-1 asked for (its figures reach it); "FAIL" read as if they did not."""
    accuracy = variant.get("accuracy")
    if not accuracy:
        return "-"
    outputs = [o for o in (accuracy.get("outputs") or {}).values() if o.get("checked", True)]
    defaults = [o for o in outputs if (o.get("metric") or "default") in ("default", "cosine")
                and o.get("cosine") is not None]
    # the worst cosine stands for the cosine-gated outputs (as before); each task metric is shown on its own
    shown = ([min(defaults, key=lambda o: o["cosine"])] if defaults else []) + [o for o in outputs if o not in defaults]
    figures = ", ".join(gate(o) for o in shown)
    verdict = "pass" if accuracy.get("passed") else "unproven" if accuracy.get("unproven") else "FAIL"
    return f"{verdict} {figures}".strip()


def ratio_text(ratio: dict[str, Any] | None) -> str:
    """A paired speed-up as "2.04x [1.99-2.07]" (median and 95% interval); "-" when there is none."""
    if not ratio or ratio.get("median") is None:
        return "-"
    return f"{ratio['median']:.2f}x [{ratio['low']:.2f}-{ratio['high']:.2f}]"


def selection_batch(report: dict[str, Any]) -> str:
    """The batch size the winner was chosen at (the report's noise batch), as latency_by_batch keys it."""
    return str((report.get("noise") or {}).get("batch") or min(report.get("config", {}).get("batch_sizes") or [1]))


def paired(variant: dict[str, Any], batch: str) -> dict[str, Any] | None:
    """The variant's own round-by-round speed-up over the original at `batch`, timed in the same run as the others."""
    return ((variant.get("latency_by_batch") or {}).get(batch) or {}).get("speedup_vs_original")


def variants_table(report: dict[str, Any]) -> str:
    """One line per variant: status, size, nodes, p50/p90/p99 and the runs they come from, speed-up over the
    original, accuracy. The runs are shown because the timing stops after ~2 s: a p99 of 20 runs is their maximum.

    The speed-up is the paired one the service decides by (median of round-by-round ratios, 95% interval), not a
    ratio of two p50s: those were timed apart and land on either side of the noise (a fused graph read 1.42x by
    p50s while its paired rounds did not clear the noise, and the table contradicted the 'selected:' line)."""
    rows = report["variants"]
    batch = selection_batch(report)
    # As wide as the longest name: auto's names (int8-static-minmax-qoperator-u8s8-heavy-repair-greedy2)
    # overflowed a fixed width and pushed every column after them out of line.
    width = max([len("variant") - 1, *(len(v["name"]) for v in rows)]) + 1
    speed_width = max([len("vs original [95%]"), *(len(ratio_text(paired(v, batch))) for v in rows)])
    header = (
        f"{'variant':{width + 1}} {'status':9} {'size KiB':>9} {'nodes':>6} {'p50 ms':>9} {'p90 ms':>9} "
        f"{'p99 ms':>9} {'runs':>5} {'vs original [95%]':>{speed_width}}  accuracy"
    )
    lines = [header, "-" * len(header)]
    for v in rows:
        lat = v.get("latency_ms") or {}
        speed = "1.00x" if v["name"] == report["baseline"] and lat else ratio_text(paired(v, batch))
        mark = "*" if v["name"] == report["selected"] else " "
        size = v["size_bytes"] / 1024 if v.get("size_bytes") else None
        runs = ((v.get("latency_by_batch") or {}).get(batch) or {}).get("runs") if lat else None
        lines.append(
            f"{mark}{v['name']:{width}} {v['status']:9} {_fmt(size, '9.1f'):>9} {_fmt(v.get('node_count')):>6} "
            f"{_fmt(lat.get('p50'), '9.3f'):>9} {_fmt(lat.get('p90'), '9.3f'):>9} {_fmt(lat.get('p99'), '9.3f'):>9} "
            f"{_fmt(runs):>5} {speed:>{speed_width}}  {_accuracy(v)}"
        )
        if v.get("reason"):
            lines.append(f"{'':{width + 3}}{v['reason'][:200]}")
    return "\n".join(lines)


def served_speedup(report: dict[str, Any]) -> str:
    """The speed-up the service proves for what it serves: the confirmation run's paired figure, or 1x for the
    original. The selection run's figure of the winner is its best draw among the candidates: it tends to be higher."""
    if report["selected"] == report["baseline"]:
        tried = (report.get("confirmation") or {}).get("speedup")
        unconfirmed = (
            f" ({report['confirmation']['variant']} measured {ratio_text(tried)} when timed again: not confirmed)"
            if tried
            else ""
        )
        return f"served speed-up: 1.00x (the original serves){unconfirmed}"
    confirmed = report.get("speedup_paired")
    if not confirmed:  # a report written before paired timing: say what the figure is
        return f"served speed-up: {_fmt(report.get('speedup_p50'))}x by p50s (not a paired measurement)"
    chosen = report.get("speedup_selection")
    selection = f"; the selection run, where it was chosen, measured {ratio_text(chosen)}" if chosen else ""
    return (
        f"served speed-up: {confirmed['median']:.2f}x the original [95%: {confirmed['low']:.2f}-"
        f"{confirmed['high']:.2f}, {confirmed['rounds']} paired rounds, timed again against it alone]{selection}"
    )


def summary(report: dict[str, Any]) -> str:
    """The table plus the decision, the provider and the calibration used."""
    calibration = report.get("calibration", {})
    data = (
        "synthetic inputs"
        if calibration.get("synthetic")
        else (f"{calibration.get('samples')} calibration + {calibration.get('holdout_samples')} held-back samples")
    )
    lines = [
        variants_table(report),
        f"vs original: median of round-by-round speed-ups over the original at batch {selection_batch(report)}, "
        "all variants timed interleaved in one run, with the 95% interval",
        "",
        f"provider: {_provider(report)}   accuracy data: {data}",
        f"selected: {report['selected']} ({report.get('selection_reason', '')})",
        f"{served_speedup(report)}   size ratio: {_fmt(report.get('size_ratio'))}",
    ]
    lines += [f"note: {note}" for note in report.get("accuracy_notes", [])]
    return "\n".join(lines)


def _provider(report: dict[str, Any]) -> str:
    """The provider that measured, and the one asked for when it was not usable (the fallback's warning is a log
    line, which `--quiet` hides: the table is what stays)."""
    asked = (report.get("config") or {}).get("provider")
    if asked in (None, "auto", report["provider"]):
        return report["provider"]
    return f"{report['provider']} ({asked} was asked for and is not usable here)"

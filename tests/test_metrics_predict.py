"""The predict series bound once per model version: the same counts and latencies as looked up per request."""

from __future__ import annotations

import time

from app.metrics import Metrics


def _value(metrics: Metrics, line_start: str) -> float:
    lines = [line for line in metrics.render()[0].decode().splitlines() if line.startswith(line_start + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_a_bound_series_counts_answers_and_errors_and_times_only_answers() -> None:
    metrics = Metrics(lambda: {}, lambda: 0)
    series = metrics.predict_series("m", 3, "int8")
    started = time.perf_counter() - 0.002  # a predict that took 2 ms
    series.observe(started, "ok")
    series.observe(started, "ok")
    series.observe(started, "rejected")
    series.observe(started, "failed")
    series.observe(started, "failed")
    labels = 'model="m",{}variant="int8",version="3"'
    assert _value(metrics, "onnxforge_predict_requests_total{" + labels.format('outcome="ok",') + "}") == 2
    assert _value(metrics, "onnxforge_predict_requests_total{" + labels.format('outcome="rejected",') + "}") == 1
    assert _value(metrics, "onnxforge_predict_requests_total{" + labels.format('outcome="failed",') + "}") == 2
    assert _value(metrics, "onnxforge_predict_latency_seconds_count{" + labels.format("") + "}") == 2
    assert 0.004 <= _value(metrics, "onnxforge_predict_latency_seconds_sum{" + labels.format("") + "}") < 1
    # Bound again (a route rebuilt after an upload): the same children, the counts go on.
    metrics.predict_series("m", 3, "int8").observe(started, "ok")
    assert _value(metrics, "onnxforge_predict_requests_total{" + labels.format('outcome="ok",') + "}") == 3

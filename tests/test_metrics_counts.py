"""The HTTP, predict and batching series (app/metrics.py) are plain numbers exported at scrape time: the scrape must
say exactly what prometheus_client's own Counter, Histogram and Gauge said for the same observations (names, help,
types, labels, bucket bounds, values), bounds included (a value equal to a bucket's bound counts in it)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.metrics import LATENCY_BUCKETS, Metrics, QueueState

VERSIONED = ["model", "version", "variant"]
LATENCIES = (0.0001, 0.0004, 0.0009, 0.002, 0.02, 0.3, 9.0, 20.0)  # between and past the bounds (timed: never on one)
WAITS = (0.0, 0.0005, 0.00051, 0.01, 7.0, 11.0)  # 0.0005: on a bound, counted in it
SIZES = (1, 5, 32, 128, 129)


def _reference() -> bytes:
    """The same observations through prometheus_client's own metric classes (how app/metrics.py kept them before)."""
    registry = CollectorRegistry()
    http = Counter("onnxforge_http_requests", "HTTP requests by route template and status",
                   ["method", "route", "status"], registry=registry)
    predicts = Counter("onnxforge_predict_requests", _help(), [*VERSIONED, "outcome"],
                       registry=registry)
    latency = Histogram("onnxforge_predict_latency_seconds", "Predict latency (input checks, queueing and session.run)",
                        VERSIONED, buckets=LATENCY_BUCKETS, registry=registry)
    size = Histogram("onnxforge_batch_size", "Rows per batched session.run (dynamic batching)", VERSIONED,
                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
    queue = Histogram("onnxforge_batch_queue_seconds", "Time a request waited in the batching queue", VERSIONED,
                      buckets=LATENCY_BUCKETS, registry=registry)
    depth = Gauge("onnxforge_batch_queue_depth", "Requests waiting in the batching queue after the last dispatch",
                  VERSIONED, registry=registry)
    for status in ("200", "200", "404", "503"):
        http.labels("POST", "/v2/models/{name}/infer", status).inc()
    http.labels("GET", "/healthz", "200").inc()
    for outcome in ("ok", "rejected", "failed"):
        predicts.labels("m", "3", "int8", outcome)
        predicts.labels("idle", "1", "original", outcome)
    latency.labels("idle", "1", "original")
    for seconds in LATENCIES:
        predicts.labels("m", "3", "int8", "ok").inc()
        latency.labels("m", "3", "int8").observe(seconds)
    predicts.labels("m", "3", "int8", "rejected").inc()
    predicts.labels("m", "3", "int8", "failed").inc()
    predicts.labels("m", "3", "int8", "failed").inc()
    for rows in SIZES:
        size.labels("m", "3", "int8").observe(rows)
        depth.labels("m", "3", "int8").set(rows % 7)
    for seconds in WAITS:
        queue.labels("m", "3", "int8").observe(seconds)
    return generate_latest(registry)


def _help() -> str:
    return ("Predict requests by model, version, variant and outcome: ok; rejected (its inputs failed their checks, "
            "or its client went away before its run); failed (the run raised or passed the time limit: the model's "
            "or the service's side)")


def _ours() -> Metrics:
    metrics = Metrics(lambda: {}, lambda: 0)
    for status in ("200", "200", "404", "503"):
        metrics.count_http("POST", "/v2/models/{name}/infer", status)
    metrics.count_http("GET", "/healthz", "200")
    series = metrics.predict_series("m", 3, "int8")
    metrics.predict_series("idle", 1, "original")
    for seconds in LATENCIES:
        series.observe(time.perf_counter() - seconds, "ok")
    series.observe(0.0, "rejected")
    series.observe(0.0, "failed")
    series.observe(0.0, "failed")
    for i, rows in enumerate(SIZES):
        metrics.observe_batch(("m", "3", "int8"), rows % 7, rows, list(WAITS) if i == 0 else [])
    return metrics


def _samples(text: bytes) -> dict[str, float]:
    """Every line of our families (not process_* or the state gauges) -> its value; latency sums to 0.1 s."""
    out = {}
    for line in text.decode().splitlines():
        name = line.split("{")[0].split(" ")[0] if not line.startswith("#") else line
        if line.startswith("#"):
            if any(family in line for family in ("http_requests", "predict_", "batch_")):
                out[line] = 0.0
            continue
        if not name.startswith(("onnxforge_http", "onnxforge_predict", "onnxforge_batch")):
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = round(float(value), 1) if "latency_seconds_sum" in key else float(value)
    return out


def test_the_scrape_says_what_prometheus_clients_own_metrics_said() -> None:
    ours = _samples(_ours().render()[0])
    reference = _samples(_reference())
    assert ours == reference
    # spot checks on the numbers themselves (not only "as before")
    assert ours['onnxforge_http_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"}'] == 2
    labels = 'model="m",variant="int8",version="3"'
    assert ours['onnxforge_predict_latency_seconds_bucket{le="0.0005",' + labels + "}"] == 2
    assert ours['onnxforge_predict_latency_seconds_bucket{le="+Inf",' + labels + "}"] == 8
    assert ours['onnxforge_predict_requests_total{' + labels.replace('variant', 'outcome="failed",variant') + "}"] == 2
    assert ours['onnxforge_batch_size_bucket{le="128.0",' + labels + "}"] == 4
    assert ours['onnxforge_batch_size_sum{' + labels + "}"] == sum(SIZES)
    assert ours['onnxforge_batch_queue_seconds_bucket{le="0.0005",' + labels + "}"] == 2
    assert ours['onnxforge_batch_queue_depth{' + labels + "}"] == 129 % 7


def test_a_deleted_versions_series_leave_the_scrape_and_come_back_from_zero() -> None:
    metrics = _ours()
    text = metrics.render(QueueState(0, 0.0, frozenset({("idle", "1")})))[0].decode()
    assert 'model="m"' not in text and 'model="idle"' in text
    assert metrics.versions_with_series() == {("idle", "1")}
    metrics.predict_series("m", 3, "int8").observe(time.perf_counter(), "ok")
    samples = _samples(metrics.render()[0])
    assert samples['onnxforge_predict_requests_total{model="m",outcome="ok",variant="int8",version="3"}'] == 1

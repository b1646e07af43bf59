"""Prometheus metrics, in a registry per app (not the process-global one), so tests can build many apps.

Predict counts and latencies are labelled by model, version and variant, and only recorded once the
model is known to exist: labels from arbitrary request paths would let any client grow the series.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.routing import Match

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The `_created` series (a timestamp per counter and histogram child) double what a scrape carries and no
# dashboard of ours reads them. The switch is prometheus_client's own and process-wide.
disable_created_metrics()


@dataclass(frozen=True)
class QueueState:
    """What /metrics reads from the database at each scrape, beside the job counts."""

    workers_seen: int  # workers that beat lately, by /readyz's rule
    oldest_queued_s: float  # age of the oldest queued job (0 when none is queued)
    live_versions: frozenset[tuple[str, str]]  # (model, version) still live among those with series here


class _StateCollector(Collector):
    """Gauges read when scraped: jobs by status (from the database) and loaded sessions."""

    def __init__(self, job_counts: Callable[[], dict[str, int]], sessions_loaded: Callable[[], int],
                 sessions_bytes: Callable[[], int], validations: Callable[[], tuple[int, int]]) -> None:
        self.job_counts = job_counts
        self.sessions_loaded = sessions_loaded
        self.sessions_bytes = sessions_bytes
        self.validations = validations

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        jobs = GaugeMetricFamily("onnxforge_jobs", "Optimization jobs by status", labels=["status"])
        try:
            for status, count in self.job_counts().items():
                jobs.add_metric([status], count)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            pass
        yield jobs
        yield GaugeMetricFamily("onnxforge_sessions_loaded", "ONNX Runtime sessions in the cache",
                                value=self.sessions_loaded())
        yield GaugeMetricFamily("onnxforge_sessions_estimated_bytes",
                                "Estimated memory of the loaded sessions (what session_cache_max_mb bounds)",
                                value=self.sessions_bytes())
        process = GaugeMetricFamily("onnxforge_api_process", "The API process that answered this scrape: with "
                                    "`serve --workers N` each process keeps its own metrics", labels=["pid"])
        process.add_metric([str(os.getpid())], 1)
        yield process
        running, refused = self.validations()
        yield GaugeMetricFamily("onnxforge_upload_validations_running", "Uploads being validated now "
                                "(at most max_concurrent_validations)", value=running)
        yield CounterMetricFamily("onnxforge_upload_validations_refused", "Uploads answered 503 because no "
                                  "validation slot freed up in time", value=refused)


# WHY three: an operator must tell clients sending bad inputs (rejected, each told what to fix) from a model whose
# runs fail or hang (failed); one "error" count mixed them.
PREDICT_OUTCOMES = ("ok", "rejected", "failed")


class PredictSeries:
    """One model version's (variant's) predict count and latency children, looked up once rather than per
    request: even the cached lookup (`Metrics._child`: a key tuple, the version as text, three dict gets) was
    half of the ~1.8 us a predict's metrics cost here."""

    __slots__ = ("ok", "rejected", "failed", "latency")

    def __init__(self, ok, rejected, failed, latency) -> None:  # noqa: ANN001 - prometheus_client's labelled children
        self.ok, self.rejected, self.failed, self.latency = ok, rejected, failed, latency

    def observe(self, started: float, outcome: str) -> None:
        """Count one predict by its outcome (PREDICT_OUTCOMES); an answered one also records its latency since
        `started` (perf_counter)."""
        if outcome == "ok":
            self.ok.inc()
            self.latency.observe(time.perf_counter() - started)
        elif outcome == "failed":
            self.failed.inc()
        else:
            self.rejected.inc()


class Metrics:
    def __init__(self, job_counts: Callable[[], dict[str, int]], sessions_loaded: Callable[[], int],
                 sessions_bytes: Callable[[], int] = lambda: 0,
                 validations: Callable[[], tuple[int, int]] = lambda: (0, 0)) -> None:
        self.registry = CollectorRegistry()
        # The process's memory, CPU and open files (process_*: read from /proc at each scrape, ~0.1 ms) and the
        # Python version (python_info, fixed): the process-global registry has them, ours would not. Memory must
        # be visible: ONNX Runtime's memory pool grows per loaded session (README, known limits).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.http_requests = Counter(
            "onnxforge_http_requests", "HTTP requests by route template and status",
            ["method", "route", "status"], registry=self.registry,
        )
        self.predict_requests = Counter(
            "onnxforge_predict_requests", "Predict requests by model, version, variant and outcome: ok; rejected "
            "(its inputs failed their checks, or its client went away before its run); failed (the run raised or "
            "passed the time limit: the model's or the service's side)",
            ["model", "version", "variant", "outcome"], registry=self.registry,
        )
        self.predict_latency = Histogram(
            "onnxforge_predict_latency_seconds", "Predict latency (input checks, queueing and session.run)",
            ["model", "version", "variant"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "onnxforge_batch_size", "Rows per batched session.run (dynamic batching)",
            ["model", "version", "variant"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry,
        )
        self.batch_queue_time = Histogram(
            "onnxforge_batch_queue_seconds", "Time a request waited in the batching queue",
            ["model", "version", "variant"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_queue_depth = Gauge(
            "onnxforge_batch_queue_depth", "Requests waiting in the batching queue after the last dispatch",
            ["model", "version", "variant"], registry=self.registry,
        )
        self.registry.register(_StateCollector(job_counts, sessions_loaded, sessions_bytes, validations))
        # (metric name, label values) -> the labelled child. prometheus_client's labels() validates and locks
        # on every call: ~10 us of a predict's ~200 us on a small model; a dict lookup is ~0.1 us. The label
        # sets are bounded (routes x methods x statuses; served model versions), as they are in the registry.
        self._children: dict[tuple, object] = {}
        # HTTP counts keyed by their labels alone: every request counts one, so no (metric, labels) key to build.
        self._http: dict[tuple[str, str, str], object] = {}
        # The series labelled by model and version (predict counts and latency, batching), dropped together
        # when the version is deleted.
        self._by_version = (self.predict_requests, self.predict_latency, self.batch_size, self.batch_queue_time,
                            self.batch_queue_depth)

    def _child(self, metric, *labels: str):  # noqa: ANN001, ANN202 - a prometheus_client metric and its child
        key = (id(metric), labels)  # the metrics live as long as this object
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_http(self, method: str, route: str, status: str) -> None:
        labels = (method, route, status)
        child = self._http.get(labels)
        if child is None:
            child = self._http[labels] = self.http_requests.labels(*labels)
        child.inc()

    def predict_series(self, model: str, version: int, variant: str) -> PredictSeries:
        """The predict series of one model version's variant, bound once (the predict service keeps it per route)."""
        labels = (model, str(version), variant)
        return PredictSeries(*(self._child(self.predict_requests, *labels, outcome) for outcome in PREDICT_OUTCOMES),
                             self._child(self.predict_latency, *labels))

    def observe_batch(self, labels: tuple[str, str, str], depth: int, size: int, waited: list[float]) -> None:
        self._child(self.batch_queue_depth, *labels).set(depth)
        self._child(self.batch_size, *labels).observe(size)
        histogram = self._child(self.batch_queue_time, *labels)
        for seconds in waited:
            histogram.observe(seconds)

    def versions_with_series(self) -> set[tuple[str, str]]:
        """(model, version) of every model version this process has predict or batching series for."""
        ids = {id(metric) for metric in self._by_version}
        # list(): a snapshot taken under the GIL; predict and batching threads may add children meanwhile
        return {labels[:2] for (metric_id, labels) in list(self._children) if metric_id in ids}

    def forget_versions(self, gone: set[tuple[str, str]]) -> None:
        """Drop the series of deleted model versions: otherwise each deleted version's counters and histograms
        (~50 lines a variant) stay in every scrape until the process restarts."""
        if not gone:
            return
        metrics = {id(metric): metric for metric in self._by_version}
        for key in [k for k in list(self._children) if k[0] in metrics and k[1][:2] in gone]:
            self._children.pop(key, None)
            metrics[key[0]].remove(*key[1])

    def render(self, queue: QueueState | None = None) -> tuple[bytes, str]:
        """The scrape; with `queue` (read from the database by the caller), the operators' queue gauges too,
        and the series of versions deleted since (here or through another replica) are dropped first."""
        if queue is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        self.forget_versions(self.versions_with_series() - queue.live_versions)
        return generate_latest(_With(self.registry, _queue_families(queue))), CONTENT_TYPE_LATEST


def _queue_families(queue: QueueState) -> list:
    return [
        GaugeMetricFamily("onnxforge_workers_seen", "Optimizer workers (any host) that beat lately: /readyz's "
                          "workers_seen; 0 with jobs queued means nobody runs them", value=queue.workers_seen),
        GaugeMetricFamily("onnxforge_queue_oldest_seconds", "Age of the oldest queued optimization job since its "
                          "upload (0: none queued)", value=queue.oldest_queued_s),
    ]


class _With:
    """A registry's metrics followed by some read at this scrape (generate_latest needs only `collect`)."""

    def __init__(self, registry: CollectorRegistry, families: list) -> None:
        self.registry, self.families = registry, families

    def collect(self) -> Iterator:
        yield from self.registry.collect()
        yield from self.families


class HttpMetricsMiddleware:
    """Count every request by method, route template (not raw path) and status. Pure ASGI: no body buffering.

    Installed outermost, so answers the security middlewares give before any route runs (401, 403, 413)
    are counted with their real status; their route template is found by matching `routes` the way the
    router would, since the router never saw them.
    """

    def __init__(self, app, metrics: Callable[[], Metrics | None], routes: Callable[[], list]) -> None:  # noqa: ANN001
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics = self.metrics()
            if metrics is not None:
                route = scope.get("route") or self._route_of(scope)
                template = getattr(route, "path", None) or "unmatched"
                metrics.count_http(scope["method"], template, str(status["code"]))

    def _route_of(self, scope) -> object | None:  # noqa: ANN001
        """The route the router would have chosen (a full match, else one that differs only in method)."""
        partial = None
        for route in _flat(self.routes()):
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route
            if match is Match.PARTIAL and partial is None:
                partial = route
        return partial


def _flat(routes: list) -> Iterator:
    """The routes of `routes` with included routers opened (FastAPI keeps an included router as one entry;
    ours are included without a prefix, so their routes' own templates are the full ones)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat(inner.routes)
        else:
            yield route

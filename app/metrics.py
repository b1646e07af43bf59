"""Prometheus metrics, in a registry per app (not the process-global one), so tests can build many apps.

Predict counts and latencies are labelled by model, version and variant, and only recorded once the
model is known to exist: labels from arbitrary request paths would let any client grow the series.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
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
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class _Histogram:
    """A histogram's counts per bucket (not cumulative; the last one is +Inf) and sum, as plain numbers."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bound >= value: prometheus' `le`
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last, as prometheus_client's Histogram exposes them."""
        counts, total, pairs = list(self.counts), 0, []
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), counts, strict=True):
            total += count
            pairs.append((bound, float(total)))
        return pairs


class PredictSeries:
    """One model version's (variant's) predict counts by outcome and latency histogram, bound once per route.

    WHY plain numbers, not prometheus_client children: each child's inc and observe took a lock and several Python
    calls (~2 us a predict on the event loop, where every microsecond is requests/s); these are only updated on the
    event loop and read by `Metrics`' collector at scrape time, under the same names, labels and values."""

    __slots__ = ("counts", "latency")

    def __init__(self) -> None:
        self.counts = [0, 0, 0]  # by PREDICT_OUTCOMES
        self.latency = _Histogram(LATENCY_BUCKETS)

    def observe(self, started: float, outcome: str) -> None:
        """Count one predict by its outcome (PREDICT_OUTCOMES); an answered one also records its latency since
        `started` (perf_counter)."""
        if outcome == "ok":
            self.counts[0] += 1
            self.latency.observe(time.perf_counter() - started)
        elif outcome == "failed":
            self.counts[2] += 1
        else:
            self.counts[1] += 1


class _BatchSeries:
    """One model version's (variant's) batching figures, from its first dispatch."""

    __slots__ = ("depth", "queue", "size")

    def __init__(self) -> None:
        self.depth = 0.0
        self.size = _Histogram(BATCH_SIZE_BUCKETS)
        self.queue = _Histogram(LATENCY_BUCKETS)


class _CountsCollector(Collector):
    """The HTTP, predict and batching series of a `Metrics`, as prometheus_client's Counter, Histogram and Gauge
    exposed them (same names, help, labels, values), built at scrape time from its plain numbers."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        m = self.metrics
        # list(): snapshots taken under the GIL (a scrape runs in a thread while the event loop counts)
        http = CounterMetricFamily("onnxforge_http_requests", "HTTP requests by route template and status",
                                   labels=["method", "route", "status"])
        for labels, count in list(m._http.items()):
            http.add_metric(labels, float(count))
        yield http
        versioned = ["model", "version", "variant"]
        predicts, batches = list(m._predict.items()), list(m._batch.items())
        requests = CounterMetricFamily("onnxforge_predict_requests", _PREDICT_HELP, labels=[*versioned, "outcome"])
        latency = HistogramMetricFamily("onnxforge_predict_latency_seconds",
                                        "Predict latency (input checks, queueing and session.run)", labels=versioned)
        for labels, series in predicts:
            counts = list(series.counts)
            for outcome, count in zip(PREDICT_OUTCOMES, counts, strict=True):
                requests.add_metric([*labels, outcome], float(count))
            latency.add_metric(labels, series.latency.buckets(), series.latency.sum)
        yield requests
        yield latency
        size = HistogramMetricFamily("onnxforge_batch_size", "Rows per batched session.run (dynamic batching)",
                                     labels=versioned)
        queue = HistogramMetricFamily("onnxforge_batch_queue_seconds", "Time a request waited in the batching queue",
                                      labels=versioned)
        depth = GaugeMetricFamily("onnxforge_batch_queue_depth",
                                  "Requests waiting in the batching queue after the last dispatch", labels=versioned)
        for labels, series in batches:
            size.add_metric(labels, series.size.buckets(), series.size.sum)
            queue.add_metric(labels, series.queue.buckets(), series.queue.sum)
            depth.add_metric(labels, series.depth)
        yield size
        yield queue
        yield depth


_PREDICT_HELP = ("Predict requests by model, version, variant and outcome: ok; rejected (its inputs failed their "
                 "checks, or its client went away before its run); failed (the run raised or passed the time limit: "
                 "the model's or the service's side)")


class Metrics:
    """WHY the HTTP, predict and batching series are plain numbers (exported by `_CountsCollector`): every request
    counts in them on the event loop, and prometheus_client's labelled children take a lock and several Python calls
    per update (~4-6 us a batched /v2 request of a small model, whose whole event-loop cost is ~70 us)."""

    def __init__(self, job_counts: Callable[[], dict[str, int]], sessions_loaded: Callable[[], int],
                 sessions_bytes: Callable[[], int] = lambda: 0,
                 validations: Callable[[], tuple[int, int]] = lambda: (0, 0), provider: str = "cpu") -> None:
        self.registry = CollectorRegistry()
        # The process's memory, CPU and open files (process_*: read from /proc at each scrape, ~0.1 ms) and the
        # Python version (python_info, fixed): the process-global registry has them, ours would not. Memory must
        # be visible: ONNX Runtime's memory pool grows per loaded session (README, known limits).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        # The label sets are bounded (routes x methods x statuses; served model versions).
        self._http: dict[tuple[str, str, str], int] = {}  # (method, route, status) -> requests
        self._predict: dict[tuple[str, str, str], PredictSeries] = {}  # (model, version, variant) -> its series
        self._batch: dict[tuple[str, str, str], _BatchSeries] = {}
        self.registry.register(_CountsCollector(self))
        self.registry.register(_StateCollector(job_counts, sessions_loaded, sessions_bytes, validations))
        # WHY: a dashboard of latencies means little without what they ran on; a replica that fell back from CUDA
        # to the CPU (onnxruntime-gpu without a usable GPU) must be visible where its latencies are.
        Gauge("onnxforge_execution_provider", "The execution provider this process serves on (1 on its label), "
              "after probing CUDA", ["provider"], registry=self.registry).labels(provider).set(1)

    def count_http(self, method: str, route: str, status: str) -> None:
        labels = (method, route, status)
        self._http[labels] = self._http.get(labels, 0) + 1

    def predict_series(self, model: str, version: int, variant: str) -> PredictSeries:
        """The predict series of one model version's variant, bound once (the predict service keeps it per route)."""
        labels = (model, str(version), variant)
        series = self._predict.get(labels)
        if series is None:
            series = self._predict[labels] = PredictSeries()
        return series

    def observe_batch(self, labels: tuple[str, str, str], depth: int, size: int, waited: list[float]) -> None:
        series = self._batch.get(labels)
        if series is None:
            series = self._batch[labels] = _BatchSeries()
        series.depth = float(depth)
        series.size.observe(size)
        queue = series.queue
        for seconds in waited:
            queue.observe(seconds)

    def versions_with_series(self) -> set[tuple[str, str]]:
        """(model, version) of every model version this process has predict or batching series for."""
        return {labels[:2] for labels in (*list(self._predict), *list(self._batch))}

    def forget_versions(self, gone: set[tuple[str, str]]) -> None:
        """Drop the series of deleted model versions: otherwise each deleted version's counters and histograms
        (~50 lines a variant) stay in every scrape until the process restarts."""
        if not gone:
            return
        for series in (self._predict, self._batch):
            for labels in [k for k in list(series) if k[:2] in gone]:
                series.pop(labels, None)

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

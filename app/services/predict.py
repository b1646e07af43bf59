"""Predict, independent of the wire protocol: numpy arrays in, numpy arrays out.

/v1 (JSON) and later /v2 (Open Inference Protocol, binary tensors) decode their request into
`dict[str, np.ndarray]`, call `PredictService.predict`, and encode the result; nothing about
versions, variants, sessions or input checks lives in a protocol module.

The request path stays off the database and the disk when it can: which version serves a name is
remembered for `cache_ttl_s` (the API forgets it at once on its own uploads and deletes; a version
that a worker finishes starts serving within the TTL), and sessions stay loaded in an LRU cache.
While the database is unreachable, a name already resolved here keeps serving its cached resolution (checked
again every `REGISTRY_RETRY_S`, without making its requests wait); a name never resolved here is a 503 with
Retry-After. One warning line when the database becomes unreachable, one when it is back.
`session.run` runs in a thread pool: ONNX Runtime releases the GIL, the event loop stays free.
With a `Batcher`, concurrent requests of a model whose batch axis is dynamic share one run
(app/runtime/batching.py); the answer of each is the same as alone. A version's own batching
settings (given at upload, stored with it) override the service's defaults for that version, except that a
model whose graph mixes the rows of a run (dynamic INT8) is never batched (`batching_note` says so, as it says
why for any model whose upload asked for batching and gets none).
Every run has a time limit (504 past it), and one model holds at most `max_running_per_model` predict
threads at once (app/runtime/runs.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from app.errors import (
    DATABASE_UNREACHABLE,
    DATABASE_UNREACHABLE_MESSAGE,
    BadRequestError,
    ConflictError,
    DatabaseUnreachableError,
    ModelLoadError,
    NotFoundError,
    ServiceError,
)
from app.metrics import Metrics, PredictSeries
from app.runtime.batching import (
    Batcher,
    BatchPolicy,
    Waiter,
    batching_pays,
    in_thread,
    rows_agree,
    unbatchable_reason,
)
from app.runtime.runs import Lane, Lanes, Limited, RowByRow, RunTimeout, Watchdog
from app.runtime.sessions import LoadedSession, SessionCache, run_memory_error
from app.services.inputs import FeedChecker
from app.services.registry import VARIANTS, Registry, serving_variant
from app.store import ModelVersion
from optimizer.errors import first_line


class RunTimeLimitError(ServiceError):
    """A run stopped at the service's time limit: the model is too slow here (or never ends) for these inputs."""

    status_code = 504


LARGE_ANSWER_ELEMENTS = 1 << 18
# While the database is unreachable, how often a name's cached resolution is checked against it again: one attempt
# per name per interval, not one per request (each failing connect costs the pool and the log nothing else).
REGISTRY_RETRY_S = 1.0

log = logging.getLogger("onnxforge.predict")


@dataclass
class Prediction:
    model: str
    version: int
    variant: str
    provider: str
    outputs: dict[str, np.ndarray]

    @property
    def large(self) -> bool:
        return large(self.outputs)


def large(outputs: dict[str, np.ndarray]) -> bool:
    """Whether encoding an answer of `outputs` belongs in a thread: a 50M-element JSON answer (200 MB) held the event
    loop, and every other request with it, for 5.8 s; below 256K elements encoding takes a few ms at most."""
    return sum(array.size for array in outputs.values()) > LARGE_ANSWER_ELEMENTS


@dataclass
class ServingModel:
    """What a protocol needs to describe or call a model: its version row, variant and loaded session."""

    row: ModelVersion
    variant: str
    loaded: LoadedSession


@dataclass(frozen=True)
class _Resolved:
    """A looked-up version and the variant each request for it gets, worked out once per lookup rather than per
    request (each read of a row's attribute goes through SQLAlchemy's descriptor)."""

    row: ModelVersion
    id: str
    variants: dict[str | None, str]  # requested variant (None: default) -> served; absent: serving_variant refuses

    @classmethod
    def of(cls, row: ModelVersion) -> _Resolved:
        variants = {}
        for requested in (None, *VARIANTS):
            try:
                variants[requested] = serving_variant(row, requested)
            except ConflictError:
                continue
        return cls(row, row.id, variants)


@dataclass(frozen=True)
class _Route:
    """What the hot path needs about one (version, variant), worked out once: it never changes. (The name and
    version are copied here: each read of the database row's attribute goes through SQLAlchemy's descriptor.)"""

    key: tuple[str, str, str, str]  # (name, version, variant, version id): the batching queue and metrics key
    policy: BatchPolicy | None  # None: each request runs alone (not batchable, or batching is off)
    outputs: tuple[str, ...]
    non_tensors: tuple[str, ...]  # outputs predict cannot answer with (sequences, maps), see _refuse_non_tensors
    name: str
    version: int
    feed: FeedChecker  # the input checks
    series: PredictSeries  # the metrics
    runner: Limited  # the session, its runs under the time limit
    lane: Executor | Lane  # where its unbatched runs go: the executor, or its lane of it (max_running_per_model)
    variant: str
    loaded: LoadedSession  # the session this route runs: a route whose session was unloaded since is built again


def batch_policy(row: ModelVersion, default: BatchPolicy) -> tuple[BatchPolicy, bool]:
    """The version's own batching settings (stored at upload) over the service's defaults, and whether
    its batch size was given (then it is honoured as is, not probed)."""
    own = row.serving or {}
    size = own.get("batch_max_size")
    delay_ms = own.get("batch_max_delay_ms")
    policy = BatchPolicy(
        max_batch_size=default.max_batch_size if size is None else int(size),
        max_delay_s=default.max_delay_s if delay_ms is None else float(delay_ms) / 1000,
    )
    return policy, size is not None


def asked_for_batching(row: ModelVersion) -> bool:
    """Whether the version's upload asked for batching: a batch size over 1, or a delay to wait for company."""
    own = row.serving or {}
    size, delay_ms = own.get("batch_max_size"), own.get("batch_max_delay_ms")
    return int(size) > 1 if size is not None else bool(delay_ms)


class PredictService:
    def __init__(self, registry: Registry, sessions: SessionCache, metrics: Metrics, executor: Executor, *,
                 cache_ttl_s: float = 1.0, max_input_elements: int | None = None,
                 batcher: Batcher | None = None, probe_batching: bool = True, run_time_limit_s: float = 0.0,
                 max_running_per_model: int = 0) -> None:
        self.registry = registry
        self.sessions = sessions
        self.metrics = metrics
        self.executor = executor
        self.cache_ttl_s = cache_ttl_s
        self.max_input_elements = max_input_elements
        if batcher is None:
            # Batching is off by default, but a version's own settings may still turn it on.
            batcher = Batcher(executor, max_batch_size=1,
                              observe=lambda key, *rest: metrics.observe_batch(key[:3], *rest))
        # One model's runs at once (0: no cap): unbatched ones queue in its lane, batches in the batcher's queue.
        self.lanes = Lanes(executor, max_running_per_model) if max_running_per_model else None
        if max_running_per_model:
            batcher.max_running = min(batcher.max_running, max_running_per_model)
        self.batcher = batcher
        self.watchdog = Watchdog(run_time_limit_s)
        # Batch a model without its own batch size only if a probe shows that batching pays for it.
        self.probe_batching = probe_batching
        self._resolved: dict[tuple[str, int | None], tuple[float, _Resolved]] = {}
        self._resolving: dict[tuple[str, int | None], asyncio.Task] = {}
        self._generations: dict[str, int] = {}  # bumped by invalidate(name): a lookup begun before is not cached
        self._routes: dict[tuple[str, str], _Route] = {}
        self._batching_notes: dict[tuple[str, str], str] = {}
        self._unreachable_since: float | None = None  # monotonic time the database lookups started failing

    # -- which version, which session ---------------------------------------------------------------

    async def _resolve(self, name: str, version: int | None) -> _Resolved:
        key = (name, version)
        cached = self._resolved.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        lookup = self._resolving.get(key)
        if lookup is None:  # one database query per name at a time, not one per waiting request
            lookup = self._resolving[key] = asyncio.ensure_future(self._lookup(key, cached))
            lookup.add_done_callback(_retrieved)
            lookup.add_done_callback(lambda done: self._resolving.pop(key) if self._resolving.get(key) is done
                                     else None)
        if cached is not None and self._unreachable_since is not None:
            return cached[1]  # the database is out: the stale answer now, the lookup checks in the background
        # shield: a caller that goes away (client disconnect) does not cancel the others' lookup
        return await asyncio.shield(lookup)

    async def _lookup(self, key: tuple[str, int | None],
                      cached: tuple[float, _Resolved] | None) -> _Resolved:
        name, version = key
        generation = self._generations.get(name, 0)
        try:
            resolved = _Resolved.of(await run_in_threadpool(self.registry.resolve, name, version))
        except DATABASE_UNREACHABLE as exc:
            self._database_failed(exc)
            if cached is None:
                raise DatabaseUnreachableError(
                    f"{DATABASE_UNREACHABLE_MESSAGE}: model {name!r} has not been served by this server since it "
                    "started, so which version serves it is unknown until the database answers"
                ) from None
            if self._generations.get(name, 0) == generation:  # serve the stale entry; ask again after the interval
                self._resolved[key] = (time.monotonic() + REGISTRY_RETRY_S, cached[1])
            return cached[1]
        except (NotFoundError, ConflictError):
            self._database_answered()
            self._resolved.pop(key, None)
            if cached is not None:  # deleted or found unrunnable, maybe through another replica: free its sessions
                self.forget([cached[1].id])
            raise
        self._database_answered()
        if cached is not None and cached[1].id != resolved.id:
            # Another replica deleted or replaced what this name served: drop its sessions now rather
            # than when the LRU gets to them (a replaced version reloads on demand if still asked for).
            self.forget([cached[1].id])
        if self._generations.get(name, 0) == generation:  # not invalidated meanwhile: the answer is current
            self._resolved[key] = (time.monotonic() + self.cache_ttl_s, resolved)  # TTL 0: only remembered
        return resolved

    def _database_failed(self, exc: BaseException) -> None:
        """One warning when lookups start failing, not one per request (the reviewer's outage logged a traceback per
        request: 5.7 MB of log per replica in 8 s)."""
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            log.warning("the model registry's database is unreachable (%s): models resolved before keep serving their "
                        "cached version; others get 503 until it answers", first_line(exc))

    def _database_answered(self) -> None:
        if self._unreachable_since is not None:
            log.warning("the model registry's database answers again after %.1f s",
                        time.monotonic() - self._unreachable_since)
            self._unreachable_since = None

    def invalidate(self, name: str) -> None:
        """Forget which version serves `name` (after an upload or delete through this API)."""
        self._generations[name] = self._generations.get(name, 0) + 1
        for key in [k for k in self._resolved if k[0] == name]:
            self._resolved.pop(key, None)
        for key in [k for k in self._resolving if k[0] == name]:  # a lookup under way may predate the change
            self._resolving.pop(key, None)
        for key in [k for k, route in self._routes.items() if route.key[0] == name]:
            self._routes.pop(key, None)

    def forget(self, version_ids: list[str]) -> None:
        """Drop the sessions of deleted versions."""
        ids = set(version_ids)
        self.sessions.evict(lambda key: key[0] in ids)
        self.batcher.forget(lambda key: key[3] in ids)
        for key in [k for k in self._routes if k[0] in ids]:
            self._routes.pop(key, None)
        for key in [k for k in self._batching_notes if k[0] in ids]:
            self._batching_notes.pop(key, None)

    async def serving(self, name: str, version: int | None = None, variant: str | None = None) -> ServingModel:
        """The version, variant and loaded session a request for (name, version, variant) gets."""
        resolved = await self._resolve(name, version)
        row = resolved.row
        chosen = resolved.variants.get(variant) or serving_variant(row, variant)  # the latter raises why not
        key = (resolved.id, chosen)
        loaded = self.sessions.get(key)
        if loaded is None:
            loop = asyncio.get_running_loop()
            try:
                loaded = await loop.run_in_executor(
                    self.executor, self.sessions.get_or_load, key, lambda: self.registry.model_file(row, chosen)
                )
            except ServiceError:
                raise
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types
                raise ModelLoadError(
                    f"ONNX Runtime cannot load the {chosen} variant of model {row.name!r} version {row.version} "
                    f"here: {first_line(exc)}"
                ) from None
        return ServingModel(row, chosen, loaded)

    async def _route(self, model: ServingModel) -> _Route:
        """The batching key, policy and output names of a (version, variant): fixed for its life, so once."""
        key = (model.row.id, model.variant)
        route = self._routes.get(key)
        if route is not None and route.loaded is model.loaded:
            return route
        row, loaded = model.row, model.loaded
        # A variant we built whose graph mixes rows (dynamic INT8) runs a request's rows one by one (RowByRow), as its
        # accuracy was proven; the uploaded model runs as its author made it.
        split_rows = bool(loaded.row_coupling) and model.variant != "original"
        runner = (RowByRow if split_rows else Limited)(loaded.session, self.watchdog)
        policy, own_size = batch_policy(row, self.batcher.default)
        note = None
        asked = asked_for_batching(row)  # then every reason it gets no batching is said (batching_note)
        loop = asyncio.get_running_loop()
        if policy.max_batch_size <= 1:
            policy = None
            if asked:
                note = ("not batched: batching is off on this service (ONNXFORGE_BATCH_MAX_SIZE=1) and the upload "
                        "gave batch_max_delay_ms but no batch_max_size; give batch_max_size to batch it")
        elif (unbatchable := unbatchable_reason(loaded.inputs, loaded.outputs)) is not None:
            policy = None
            if asked:
                note = (f"never batched: {unbatchable}; its requests run one by one whatever its batching settings "
                        "(batching stacks requests along the first axis of every input and output)")
        elif loaded.row_coupling:  # whatever its settings say: its answers would depend on its batch-mates
            policy = None
            note = (f"never batched: its {', '.join(loaded.row_coupling)} quantize(s) a run's input with one scale "
                    "over all its rows, so a row's answer would depend on its batch-mates")
        elif self.probe_batching and not own_size:
            if not await loop.run_in_executor(self.executor, batching_pays, runner, loaded.inputs):
                policy = None
                if asked:
                    note = ("not batched: the probe at its first request found that batching does not pay for it "
                            "(8 rows cost more than half of 8 single runs); give batch_max_size at upload to "
                            "batch it anyway")
        elif await loop.run_in_executor(self.executor, rows_agree, runner, loaded.inputs) is False:
            policy = None  # its own batch size, but rows of different scales got other answers batched than alone
            note = ("never batched: a run of rows of different scales gave some rows other answers than each alone "
                    "(an op mixes the rows of a run)")
        if note is not None:
            self._batching_notes[key] = note
        route = _Route((row.name, str(row.version), model.variant, row.id), policy,
                       tuple(spec.name for spec in loaded.outputs),
                       tuple(spec.name for spec in loaded.outputs if spec.dtype is None),
                       row.name, row.version, FeedChecker(loaded.inputs),
                       self.metrics.predict_series(row.name, row.version, model.variant), runner,
                       self.lanes.lane(key) if self.lanes is not None else self.executor, model.variant, loaded)
        current = self._routes.get(key)
        if current is not None and current.loaded is loaded:  # a concurrent first request may have probed too
            return current
        self._routes[key] = route
        return route

    def _hot_route(self, name: str, version: int | None, variant: str | None) -> _Route | None:
        """The route of a request whose version lookup is still fresh and whose session is loaded and routed:
        what `serving` and `_route` would give, without their two coroutines, a ServingModel and a read of the
        row through SQLAlchemy per request. None: take the long way."""
        cached = self._resolved.get((name, version))
        if cached is None or cached[0] <= time.monotonic():
            return None
        resolved = cached[1]
        chosen = resolved.variants.get(variant)
        if chosen is None:
            return None
        key = (resolved.id, chosen)
        route = self._routes.get(key)
        if route is None or self.sessions.get(key) is not route.loaded:  # get: the LRU sees the use, as before
            return None
        return route

    # -- predict -------------------------------------------------------------------------------------

    async def predict(self, name: str, inputs: Mapping[str, np.ndarray], *, version: int | None = None,
                      variant: str | None = None, cast: bool = True,
                      output_names: list[str] | None = None) -> Prediction:
        """Run the serving variant of a model on `inputs`; BadRequestError (400) names a bad input."""
        route = self._hot_route(name, version, variant)
        if route is None:
            route = await self._route(await self.serving(name, version, variant))
        started = time.perf_counter()
        names, feed = self._checked(route, inputs, cast, output_names, started)
        try:
            if route.policy is not None:
                values = await self.batcher.run(route.key, route.runner, names, feed, route.policy)
            else:
                values = await in_thread(route.lane, route.runner.run, names, feed)
        except BaseException as exc:
            self.finish(route, started, names, None, exc)  # raises
        outputs = self.finish(route, started, names, values, None)
        return Prediction(route.name, route.version, route.variant, route.loaded.provider, outputs)

    def batched_route(self, name: str, version: int | None) -> _Route | None:
        """The route of the default variant of (name, version) when it is at hand without a coroutine (`_hot_route`)
        and its requests are batched; None otherwise (then `predict` is the way)."""
        route = self._hot_route(name, version, None)
        return route if route is not None and route.policy is not None else None

    def enqueue(self, route: _Route, inputs: Mapping[str, np.ndarray], output_names: list[str] | None,
                waiter: Waiter) -> tuple[float, tuple[str, ...] | list[str]]:
        """`predict` (cast=False) of a `batched_route` without a coroutine: the inputs' checks now (raising as
        `predict` does), then the request joins its batch queue and its outputs come to `waiter` (Batcher.enqueue),
        to be given to `finish` with what this returns (when it started, the output names).
        WHY: the short HTTP path answers batched requests from their batch's callback (app/http_protocol.py)."""
        started = time.perf_counter()
        names, feed = self._checked(route, inputs, False, output_names, started)
        self.batcher.enqueue(route.key, route.runner, names, feed, route.policy, waiter)
        return started, names

    def _checked(self, route: _Route, inputs: Mapping[str, np.ndarray], cast: bool, output_names: list[str] | None,
                 started: float) -> tuple[tuple[str, ...] | list[str], dict[str, np.ndarray]]:
        """The output names and the feed of a request, checked; raises (counted "rejected") when they are wrong."""
        try:
            feed = route.feed(inputs, cast=cast, max_elements=self.max_input_elements)
            if output_names is not None:
                unknown = [n for n in output_names if n not in route.outputs]
                if unknown:
                    raise BadRequestError(f"unknown output {unknown[0]!r}: the model's outputs are "
                                          f"{list(route.outputs)}")
            names = output_names or route.outputs  # (ONNX Runtime takes a tuple as well as a list)
            if route.non_tensors:
                _refuse_non_tensors(route, names)
        except BaseException:
            route.series.observe(started, "rejected")  # (metrics.PREDICT_OUTCOMES)
            raise
        return names, feed

    @staticmethod
    def finish(route: _Route, started: float, names: tuple[str, ...] | list[str], values: list[np.ndarray] | None,
               exc: BaseException | None) -> dict[str, np.ndarray]:
        """The outputs by name of a run that gave `values`, or the service's error for one that raised `exc`
        (raised); either way the predict is counted: ok, failed, or rejected when its caller went away
        (CancelledError) before its answer."""
        if exc is None:
            route.series.observe(started, "ok")
            return dict(zip(names, values, strict=True))
        if isinstance(exc, asyncio.CancelledError):
            route.series.observe(started, "rejected")
            raise exc
        route.series.observe(started, "failed")
        if isinstance(exc, RunTimeout):
            raise RunTimeLimitError(
                f"model {route.name!r} version {route.version}: a run took longer than the service's limit of "
                f"{exc.limit_s:g} s (ONNXFORGE_PREDICT_TIME_LIMIT_S) and was stopped; send fewer rows or "
                "smaller inputs, or ask the operator for a longer limit"
            ) from None
        if (refused := run_memory_error(exc, f"model {route.name!r} version {route.version}")) is not None:
            raise refused from None
        if isinstance(exc, Exception):  # inputs that pass the declared checks but not the graph
            raise BadRequestError(
                f"ONNX Runtime could not run model {route.name!r} on these inputs: {first_line(exc)}"
            ) from None
        raise exc

    def batching_note(self, version_id: str, variant: str) -> str | None:
        """Why a routed (version, variant) is not batched although its upload asked for it or its graph forbids
        it (None: no such reason, or it has not served yet)."""
        return self._batching_notes.get((version_id, variant))


def _retrieved(lookup: asyncio.Future) -> None:
    """Read a finished lookup's exception: a lookup nobody awaited (its callers served the stale entry) must not log
    "exception was never retrieved"."""
    if not lookup.cancelled():
        lookup.exception()


def _refuse_non_tensors(route: _Route, names: list[str]) -> None:
    """ConflictError (409) when `names` include outputs that are not tensors. WHY: uploads are refused such
    models now (optimizer.loading.require_tensor_outputs), but one stored before that check still serves, and
    both protocols encode arrays only: its every predict was a 500."""
    others = [name for name in names if name in route.non_tensors]
    if others:
        raise ConflictError(
            f"model {route.name!r} version {route.version}: output(s) {', '.join(map(repr, others))} are not tensors "
            "(a sequence or map, e.g. the ZipMap probabilities of a scikit-learn classifier) and predict answers "
            "with tensors only: export the model without them (skl2onnx: the zipmap=False option) and upload it "
            "again, or ask /v2 infer for the other outputs by name"
        )

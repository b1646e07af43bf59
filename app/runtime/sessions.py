"""A bounded cache of ONNX Runtime sessions, least recently used out first.

Sessions are expensive to create (graph optimization at load) and hold the model's weights, so the
service keeps a few and loads the rest on demand. Two bounds: a count (settings.session_cache_size)
and an estimated memory budget (settings.session_cache_max_mb); a single model over the budget
still loads, alone, rather than being unservable. Loading is single-flight per key: a burst of
requests for a cold model creates one session, not one per request. Evicting only drops the
cache's reference; a request already running keeps its session alive until it finishes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from pathlib import Path

import onnxruntime as ort

from app.errors import RunMemoryError
from app.runtime.batching import batchable, row_coupling_ops
from app.runtime.signature import TensorSpec, signature_of
from app.settings import MiB
from optimizer.runtime import SessionSettings, arena_refusal, create_session, session_provider, shared_arena

# A loaded session's memory, estimated as the model file's size times this. Measured as RSS growth
# per extra session of one model (ONNX Runtime 1.32 CPU, serving settings, median of 4 in a fresh
# process; `pytest -m slow tests/test_sessions_budget.py -k measure -s`, three runs): a MatMul MLP
# 0.9-1.2x its 80 MiB file, a 4-layer transformer 1.04-1.39x its 48 MiB (prepacked weight copies),
# so 1.5x covers weight-dominated models. The file size is known before loading, and weights
# dominate at the sizes a memory budget is for; what it misses is the activation arena, which
# depends on the inputs sent, not the file (a 1.4 MiB CNN took 10.6-11.6 MiB at 64x64): small
# models are held in check by the count bound (session_cache_size), not by this estimate.
MEMORY_PER_FILE_BYTE = 1.5


#: The least the runs of all sessions may hold together when the cache has a memory budget. WHY: the budget is sized
#: for the models' weights (a few small models: a few MiB), while a run's tensors grow with the rows sent (a
#: 1.4 MiB CNN held ~11 MiB at 64x64); a budget of 1 MiB must not refuse ordinary runs.
RUN_MEMORY_FLOOR = 1024 * MiB


def run_memory_error(exc: BaseException, what: str) -> RunMemoryError | None:
    """The service's answer (507) when `exc` is a run of `what` ("model 'm' version 2") that the shared run arena
    refused (SessionCache: its budget caps it); None for any other failure."""
    refused = arena_refusal(exc)
    if refused is None:
        return None
    asked, cap = refused
    return RunMemoryError(
        f"{what}: a run asked for {asked / MiB:,.0f} MiB at once, more than is left of the {cap / MiB:,.0f} MiB the "
        f"runs of all models on this server may hold together (ONNXFORGE_SESSION_CACHE_MAX_MB, at least "
        f"{RUN_MEMORY_FLOOR // MiB}), and was stopped; send fewer rows or smaller inputs, or ask the operator for a "
        "larger budget"
    )


def estimated_bytes(path: Path) -> int:
    """The memory a session of the model at `path` is expected to hold (see MEMORY_PER_FILE_BYTE)."""
    return int(path.stat().st_size * MEMORY_PER_FILE_BYTE)


@dataclass
class LoadedSession:
    session: ort.InferenceSession
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    provider: str  # what the session really got ("cpu" | "cuda"), read back from ONNX Runtime
    size_bytes: int = 0  # estimated memory held (estimated_bytes), for the cache's budget
    # Its ops that mix the rows of a run (batching.row_coupling_ops): such a model is never batched.
    row_coupling: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path, settings: SessionSettings) -> LoadedSession:
        session = create_session(path, settings)
        inputs, outputs = signature_of(session)
        coupling: tuple[str, ...] = ()
        if batchable(inputs, outputs):  # only then: batching is out of the question for the others
            try:
                coupling = tuple(row_coupling_ops(path))
            except Exception:  # noqa: BLE001 - a file ONNX Runtime loaded but this reader cannot: the probe decides
                coupling = ()
        return cls(session, inputs, outputs, session_provider(session), estimated_bytes(path), coupling)


class SessionCache:
    def __init__(self, capacity: int, settings: SessionSettings,
                 loader: Callable[[Path, SessionSettings], LoadedSession] = LoadedSession.load,
                 max_bytes: int = 0) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes  # budget for the sessions' estimated memory; 0 = count bound only
        # The same budget caps the memory the sessions' runs hold together (optimizer.runtime.shared_arena: tensors,
        # not weights), at least RUN_MEMORY_FLOOR: a run past it fails alone (run_memory_error) rather than taking
        # the replica's memory. One cap per process (ONNX Runtime's): the first cache's; the service makes one.
        arena = shared_arena(max(max_bytes, RUN_MEMORY_FLOOR)) if max_bytes else 0
        self.settings = replace(settings, arena_max_bytes=arena) if arena else settings
        self._loader = loader
        self._entries: OrderedDict[Hashable, LoadedSession] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable) -> LoadedSession | None:
        """The cached session, marked as just used; None if it is not loaded."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def peek(self, key: Hashable) -> LoadedSession | None:
        """The cached session without marking it used (for describing a model)."""
        with self._lock:
            return self._entries.get(key)

    def get_or_load(self, key: Hashable, path: Callable[[], Path]) -> LoadedSession:
        """The cached session, or load it from `path()` (blocking: call it off the event loop)."""
        entry = self.get(key)
        if entry is not None:
            return entry
        with self._lock:
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            entry = self.get(key)
            if entry is not None:
                return entry
            try:
                source = path()
                with self._lock:  # make room first, so the new session does not load on top of a full budget
                    self._shrink(incoming=1, incoming_bytes=estimated_bytes(source) if self.max_bytes else 0)
                entry = self._loader(source, self.settings)
                with self._lock:
                    self._entries[key] = entry
                    self._shrink(keep=1)
                return entry
            finally:
                with self._lock:
                    self._loading.pop(key, None)

    def _shrink(self, *, incoming: int = 0, incoming_bytes: int = 0, keep: int = 0) -> None:
        """Drop least recently used sessions until `incoming` more sessions of `incoming_bytes` fit in both
        bounds (lock held); never the `keep` most recent (the one just loaded stays, even alone over budget)."""
        def over() -> bool:
            if len(self._entries) + incoming > self.capacity:
                return True
            return bool(self.max_bytes) and self._bytes() + incoming_bytes > self.max_bytes

        while len(self._entries) > keep and over():
            self._entries.popitem(last=False)

    def _bytes(self) -> int:
        return sum(entry.size_bytes for entry in self._entries.values())

    @property
    def bytes(self) -> int:
        """The loaded sessions' estimated memory."""
        with self._lock:
            return self._bytes()

    def evict(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every session whose key matches; returns how many."""
        with self._lock:
            keys = [k for k in self._entries if predicate(k)]
            for key in keys:
                del self._entries[key]
            return len(keys)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

"""A bounded cache of ONNX Runtime sessions, least recently used out first.

Sessions are expensive to create (graph optimization at load) and hold the model's weights, so the
service keeps a few and loads the rest on demand. Loading is single-flight per key: a burst of
requests for a cold model creates one session, not one per request. Evicting only drops the
cache's reference; a request already running keeps its session alive until it finishes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from app.runtime.signature import TensorSpec, signature_of
from optimizer.runtime import SessionSettings, create_session, session_provider


@dataclass
class LoadedSession:
    session: ort.InferenceSession
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    provider: str  # what the session really got ("cpu" | "cuda"), read back from ONNX Runtime

    @classmethod
    def load(cls, path: Path, settings: SessionSettings) -> LoadedSession:
        session = create_session(path, settings)
        inputs, outputs = signature_of(session)
        return cls(session, inputs, outputs, session_provider(session))


class SessionCache:
    def __init__(self, capacity: int, settings: SessionSettings,
                 loader: Callable[[Path, SessionSettings], LoadedSession] = LoadedSession.load) -> None:
        self.capacity = capacity
        self.settings = settings
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
                entry = self._loader(path(), self.settings)
                with self._lock:
                    self._entries[key] = entry
                    while len(self._entries) > self.capacity:
                        self._entries.popitem(last=False)
                return entry
            finally:
                with self._lock:
                    self._loading.pop(key, None)

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

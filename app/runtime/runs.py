"""Runs with a time limit, and a cap on one model's runs at once: one slow model must not stall the others.

WHY: every model shares the predict threads. A model whose run never ends (a Loop with an astronomic trip
count) held a thread for ever, and a few requests to it held them all: every other model's predict
waited behind it. Two guards:

- `Watchdog`: each run gets its own `RunOptions`; a watchdog thread sets `terminate` on those past the
  limit, and ONNX Runtime stops the run between kernels (also between a Loop's iterations: "Exiting due
  to terminate flag being set to true") and frees the thread. The run raises `RunTimeout`. Checked once
  per `period` (a tenth of the limit, at most 1 s), so a run stops within the limit plus that; the thread
  exits when no run is in flight and starts again with the next.
- `RunGate`: at most `limit` runs of one model in the executor at once; the executor has one thread more
  than that (app/services/container.py), so a model that takes all its slots still leaves a thread to the
  others. The waiting requests queue here, on the event loop, in order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Hashable

import numpy as np
import onnxruntime as ort


class RunTimeout(Exception):  # noqa: N818 - "RunTimeoutError" reads worse and it is not the service's error type
    """A run stopped by the watchdog after `limit_s` seconds."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"the run took longer than {limit_s:g} s and was stopped")
        self.limit_s = limit_s


class Watchdog:
    """Stops `session.run` calls that take longer than `limit_s` (0: no limit)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.period = min(1.0, limit_s / 10)
        self._running: dict[int, tuple[float, ort.RunOptions]] = {}  # id(options) -> (deadline, options)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self, session, names: list[str] | None, feed: dict[str, np.ndarray]) -> list:  # noqa: ANN001
        """`session.run(names, feed)`, stopped with RunTimeout past the limit."""
        if self.limit_s <= 0:
            return session.run(names, feed)
        options = ort.RunOptions()
        key = id(options)
        with self._lock:  # with the thread's check for "nothing to watch", so that no run goes unwatched
            self._running[key] = (time.monotonic() + self.limit_s, options)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="predict-watchdog", daemon=True)
                self._thread.start()
        try:
            return session.run(names, feed, options)
        except Exception:
            if options.terminate:
                raise RunTimeout(self.limit_s) from None
            raise
        finally:
            self._running.pop(key, None)

    def _watch(self) -> None:
        while True:
            time.sleep(self.period)
            with self._lock:
                if not self._running:
                    self._thread = None
                    return
                running = list(self._running.values())
            now = time.monotonic()
            for deadline, options in running:
                if deadline <= now:
                    options.terminate = True  # read by ONNX Runtime's run in its thread: made for this


class Limited:
    """A session whose `run` goes through a watchdog: what the batcher and the probes call."""

    __slots__ = ("session", "watchdog")

    def __init__(self, session, watchdog: Watchdog) -> None:  # noqa: ANN001 - onnxruntime.InferenceSession
        self.session = session
        self.watchdog = watchdog

    def run(self, names: list[str] | None, feed: dict[str, np.ndarray]) -> list:
        return self.watchdog.run(self.session, names, feed)


class RunGate:
    """At most `limit` runs of one key at once; the others wait, first come first served. On the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: dict[Hashable, int] = {}
        self._waiting: dict[Hashable, deque[asyncio.Future]] = {}

    def running(self, key: Hashable) -> int:
        return self._running.get(key, 0)

    def waiting(self, key: Hashable) -> int:
        return len(self._waiting.get(key, ()))

    async def acquire(self, key: Hashable) -> None:
        running = self._running.get(key, 0)
        if running < self.limit and key not in self._waiting:
            self._running[key] = running + 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append(waiter)
        try:
            await waiter  # release() handed its slot over (the count stays)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed over, then cancelled: pass the slot on
                self.release(key)
            else:
                queue = self._waiting.get(key)
                if queue is not None and waiter in queue:
                    queue.remove(waiter)
                    if not queue:
                        del self._waiting[key]
            raise

    def release(self, key: Hashable) -> None:
        queue = self._waiting.get(key)
        while queue:
            waiter = queue.popleft()
            if not queue:
                del self._waiting[key]
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to it
                return
        running = self._running[key] - 1
        if running:
            self._running[key] = running
        else:
            del self._running[key]

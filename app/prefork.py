"""`onnxforge serve --workers N`: N API processes answering on one socket, one optimizer worker beside them.

WHY: one Python process parses HTTP and runs the framework on about one core; on a small model that,
not ONNX Runtime, is the limit (bench/serving.py). N processes each have their own event loop, session
cache and batcher: N times the sessions' memory, batches formed per process, /metrics per process
(the `onnxforge_api_process` gauge says which one answered a scrape). Unless intra_op_threads is set,
each process's sessions get the cores divided by N.

uvicorn's own supervisor binds the socket once, starts the processes (spawned: each builds the app
from the same settings, through `app_factory`), starts again one that dies and passes SIGTERM on, so
each process finishes its requests in flight. The optimizer worker is started by this parent, not by
each API process: N workers would run N optimizations at once, each wanting every core.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any

from app.settings import Settings

log = logging.getLogger("onnxforge")

OVERRIDES_ENV = "ONNXFORGE_SERVE_OVERRIDES"  # the command line's settings, as JSON, for the API processes

# uvicorn's options for one process or N alike. No proxy_headers: nothing in the app reads the client's address
# or scheme, and uvicorn's middleware for them (with no `server` header either) took the server's CPU per request
# to 0.81x when dropped (bench/serving.py). So a debug access log names the proxy, not the client: the proxy's
# own log has the client (it already did in Docker, where nginx is not in uvicorn's default trusted 127.0.0.1).
# The http protocol: uvicorn's httptools one, answering each response in one write (app/http_protocol.py).
UVICORN_OPTIONS: dict[str, Any] = {
    "http": "app.http_protocol:OneWriteHttpToolsProtocol",
    "proxy_headers": False,
    "server_header": False,
    "timeout_graceful_shutdown": 30,  # finish in-flight requests on SIGTERM before the lifespan shuts down
}


def app_factory():  # noqa: ANN201 - a FastAPI app; uvicorn calls this in each API process
    """The app of one API process: the parent's settings (environment + its command line), no worker of its own."""
    from app.main import create_app
    from app.worker.lifeline import die_with_parent

    die_with_parent(os.getppid())  # a SIGKILLed parent must not leave API processes holding the port
    overrides = json.loads(os.environ.get(OVERRIDES_ENV, "{}"))
    return create_app(Settings(**{**overrides, "run_worker": False}))


def _our_packages_first() -> None:
    """Put the folder holding our `app` and `optimizer` packages first in sys.path when a path entry would
    otherwise shadow them; spawned API processes take the parent's sys.path and import by it.

    WHY: onnxruntime/transformers/__init__.py appends its own folder, which holds an `optimizer.py`, to sys.path
    (its modules import their siblings through it, so it stays). An editable install (`pip install -e .`) finds
    our packages through a finder that runs after sys.path's: a child started outside the repository imported
    ORT's optimizer.py as `optimizer` and died ("'optimizer' is not a package"), over and over.
    """
    import app
    import optimizer

    for package in (app, optimizer):
        ours = Path(package.__file__).resolve()
        spec = PathFinder.find_spec(package.__name__)
        if spec is None or spec.origin is None or Path(spec.origin).resolve() != ours:
            root = str(ours.parent.parent)
            if root in sys.path:
                sys.path.remove(root)
            sys.path.insert(0, root)


def serve_processes(settings: Settings, overrides: dict[str, Any]) -> int:
    """Run `settings.workers` API processes until SIGTERM/SIGINT, with the embedded worker if the settings ask."""
    from uvicorn import Config
    from uvicorn.supervisors.multiprocess import Multiprocess

    from app.store import Database
    from app.worker.embedded import EmbeddedWorker
    from optimizer.runtime import default_threads

    if not settings.intra_op_threads:
        # The cores shared out: N processes each with a thread per core would run N x cores threads at once.
        overrides = {**overrides, "intra_op_threads": max(1, default_threads() // settings.workers)}
    os.environ[OVERRIDES_ENV] = json.dumps(overrides, default=str)  # spawned processes inherit the environment
    _our_packages_first()
    config = Config("app.prefork:app_factory", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=settings.log_level, access_log=settings.access_log,
                    **UVICORN_OPTIONS)
    # Once here, before N processes race to CREATE TABLE on SQLite.
    database = Database(settings.resolved_database_url)
    database.create_schema()
    database.dispose()
    # The optimizer worker times variants with the threads a serving process's sessions get, so the report's
    # latencies are those of what serves (with 2 processes on 2 cores: one thread each, not two).
    worker = (EmbeddedWorker(settings.model_copy(update={"intra_op_threads": overrides.get(
        "intra_op_threads", settings.intra_op_threads)})) if settings.run_worker else None)
    socket = config.bind_socket()

    stopped_by: list[int] = []

    class Supervisor(Multiprocess):
        def keep_subprocess_alive(self) -> None:
            super().keep_subprocess_alive()
            if worker is not None and not self.should_exit.is_set():
                worker.poll()  # from this (main) thread: the worker's death signal is tied to its parent thread

        def handle_int(self) -> None:
            self._stop(signal.SIGINT)
            super().handle_int()

        def handle_term(self) -> None:
            self._stop(signal.SIGTERM)
            super().handle_term()

        def _stop(self, sig: int) -> None:
            # The listening socket closed now, not when the API processes have drained: the kernel would otherwise
            # queue new connections on it that nobody accepts (they hung until the parent exited, then were reset).
            # Closed, they are refused at once, and a proxy tries another replica.
            socket.close()
            stopped_by.append(sig)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if worker is not None:
        worker.start()
    try:
        Supervisor(config, sockets=[socket]).run()
    finally:
        if worker is not None:
            worker.stop()
        socket.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stopped_by:
        # Stopped by a signal, die by it as `onnxforge serve` with one process does (uvicorn raises it again):
        # exit status 143 after SIGTERM either way.
        signal.raise_signal(stopped_by[0])
    return 0

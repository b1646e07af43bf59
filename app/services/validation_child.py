"""Run an upload's heavy checks (the model's load, checker, ONNX Runtime session, shape inference, the samples) in a
child process of its own, one per upload.

WHY: in the API process, validating a 576 MiB model held the GIL for seconds (the worst predict on the same replica
went from ~0.05 s to 4-20 s) and raised its RSS to 1.3 GB, memory the allocator kept. A child gives both back when it
exits, and a child the kernel kills for memory is an error answer instead of a dead replica.

HOW: one fork server per API process, started on the first upload as `python -m app.services.validation_child
<API pid>` (not multiprocessing, which re-imports the parent's main script: app/worker/embedded.py). It imports the
checks once (~1 s) and forks a fresh child per upload (milliseconds), so an upload pays no start-up and each
validation's memory goes with its child. Lines of JSON: the API sends {"id", "request"} (check_contents's
arguments) or {"id", "kill"}; the server answers {"id", "pid"} at the fork and {"id", "exit", "answer"} when the
child is gone, the answer being {"facts": {...}} or {"error": {...}}, which the API re-raises as the class and
message the child met (same status, same words). The server dies with the API, each child with the server
(app/worker/lifeline.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from typing import Any, BinaryIO

from app.errors import ServiceError, StorageError
from optimizer.errors import OptimizerError

#: How long one validation may take (a 576 MiB model took 60-90 s at nice 0 and ~200 s at nice 10 on 2 cores at a load
#: of 11). Wanted as the setting ONNXFORGE_VALIDATION_TIME_LIMIT_S (app/settings.py is not this module's to change).
VALIDATION_TIME_LIMIT_S = 900.0
_POLL_S = 0.02  # how often the server looks for children that ended while some run
#: A validation is background work: on a busy machine the predicts of the same replica go first (576 MiB upload on
#: 2 cores at load 11, side by side: predict p99 during it 89/67 -> 47/45 ms, the validation 80 -> 200 s).
_NICE = 10

log = logging.getLogger("onnxforge.api")


class ValidationTimeoutError(ServiceError):
    """504: the checks ran past the time limit and were stopped (the service's limit, as predict's 504)."""

    status_code = 504


class ValidationCrashedError(ServiceError):
    """500: the child died without an answer (killed: most often by the kernel when memory ran out)."""

    status_code = 500


# -- the API's side -----------------------------------------------------------------------------------------------


class _Server:
    """The fork server and the thread that reads its answers (one per API process, restarted if it dies)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.SimpleQueue] = {}  # the running server's uploads, by id
        self._process: subprocess.Popen | None = None

    def submit(self, message: dict[str, Any]) -> tuple[int, queue.SimpleQueue]:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            assert self._process is not None and self._process.stdin is not None
            ident = next(self._ids)
            answers: queue.SimpleQueue = queue.SimpleQueue()
            self._waiting[ident] = answers
            self._send({"id": ident, **message})
        return ident, answers

    def kill(self, ident: int) -> None:
        with self._lock:
            self._send({"id": ident, "kill": True})

    def forget(self, ident: int) -> None:
        with self._lock:
            self._waiting.pop(ident, None)

    def _send(self, message: dict[str, Any]) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(json.dumps(message).encode() + b"\n")
            self._process.stdin.flush()
        except OSError:  # the server is gone: its reader thread tells every waiting upload
            pass

    def _start(self) -> None:
        started, waiting = threading.Event(), {}
        self._waiting = waiting  # this server's own: a dead one's reader must not fail the next one's uploads

        def read() -> None:
            # The server is started from this thread, which lives as long as it: the server's death signal
            # (PR_SET_PDEATHSIG) fires when the thread that started it ends, and the API's request threads come and go.
            process = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid())], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE)
            self._process = process
            started.set()
            assert process.stdout is not None
            for line in process.stdout:
                message = json.loads(line)
                with self._lock:
                    answers = waiting.get(message["id"])
                if answers is not None:
                    answers.put(message)
            process.wait()
            with self._lock:
                gone = list(waiting.values())
                waiting.clear()
            for answers in gone:
                answers.put({"exit": process.returncode, "server": True})

        threading.Thread(target=read, name="validation-server", daemon=True).start()
        started.wait()


_server = _Server()


def run_checks(request: dict[str, Any]) -> dict[str, Any]:
    """The facts `check_contents(**request)` returns, computed in a child process; its error re-raised here."""
    limit = VALIDATION_TIME_LIMIT_S
    ident, answers = _server.submit({"request": request})
    deadline, timed_out = time.monotonic() + limit, False
    try:
        while True:
            try:
                message = answers.get(timeout=30.0 if timed_out else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                if timed_out:  # the kill was not confirmed either: the server is stuck
                    raise _crashed(None) from None
                timed_out = True
                _server.kill(ident)
                continue
            if "exit" in message:
                break
    finally:
        _server.forget(ident)
    try:
        answer = json.loads(message.get("answer") or "")  # a child that finished as it was killed has answered
    except ValueError:
        if timed_out:
            raise ValidationTimeoutError(
                f"validating the model took longer than {limit:g} s (the checker, ONNX Runtime's load, shape "
                "inference and the calibration samples) and was stopped: nothing was kept. A model this slow to check "
                "is unusual: try again when the server is less busy, or ask the operator to raise the limit") from None
        raise _crashed(message["exit"]) from None
    if "error" in answer:
        raise _rebuild(answer["error"])
    return answer["facts"]


def _crashed(returncode: int | None) -> ValidationCrashedError:
    if returncode is None:
        said = "did not answer"
    elif returncode < 0:
        try:
            said = f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            said = f"was killed by signal {-returncode}"
        if -returncode == signal.SIGKILL:
            said += " (the kernel's out-of-memory killer does this: checking a model takes about 2-3x its size)"
    else:
        said = f"exited with status {returncode} without an answer"
    return ValidationCrashedError(
        f"the process validating the upload {said}; nothing was kept. Send the upload again; if it fails again, the "
        "server has too little memory for this model (the server log may say more)")


def _error_classes(base: type) -> dict[str, type]:
    found, todo = {}, [base]
    while todo:
        cls = todo.pop()
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        todo.extend(cls.__subclasses__())
    return found


class _Relayed(ServiceError):
    """An error met in the child whose class cannot be rebuilt here: same status, headers and message."""

    def __init__(self, message: str, status_code: int, headers: dict[str, str] | None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.headers = headers


def _rebuild(error: dict[str, Any]) -> Exception:
    """The child's error as the class it was (so the API answers exactly as if it had met it itself)."""
    classes = {**_error_classes(ServiceError), **_error_classes(OptimizerError)}
    cls = classes.get(error["class"] or "")
    message = error["message"]
    if cls is not None and issubclass(cls, StorageError):
        return StorageError(message, error["errno"])
    if cls is not None:
        try:
            rebuilt = cls(message)
        except TypeError:  # an __init__ of its own: keep the answer, not the class
            rebuilt = None
        if rebuilt is not None and str(rebuilt) == message:
            return rebuilt
    return _Relayed(message, error["status"], error["headers"])


# -- the server's side --------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ServiceError | OptimizerError):
        return {"class": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc),
                "status": getattr(exc, "status_code", 400), "headers": getattr(exc, "headers", None),
                "errno": exc.errno if isinstance(exc, StorageError) else None}
    # A bug: the API answers it as any other (500, "internal error (...)"); the traceback is in the log already.
    return {"class": None, "message": f"internal error ({type(exc).__name__}); the server log has the details",
            "status": 500, "headers": None, "errno": None}


def _child(request: dict[str, Any], server_pid: int, answer_fd: int) -> None:
    """In the forked child: run the checks, write the answer, exit (never returns)."""
    code = 1
    try:
        from app.services.fold_guard import limit_address_space
        from app.services.uploads import check_contents
        from app.worker.lifeline import die_with_parent

        die_with_parent(server_pid)
        if request.get("memory_limit_mb") is not None:  # a fold past it fails here, not in the API process at predict
            limit_address_space(request["memory_limit_mb"])
        try:
            answer: dict[str, Any] = {"facts": check_contents(**request)}
        except Exception as exc:  # noqa: BLE001 - every failure must reach the API as an answer
            if not isinstance(exc, ServiceError | OptimizerError):
                log.error("validating an upload failed:\n%s", traceback.format_exc())
            answer = {"error": _describe(exc)}
        data = memoryview(json.dumps(answer).encode())
        while data:
            data = data[os.write(answer_fd, data):]
        code = 0
    finally:
        os._exit(code)


def serve(api_pid: int) -> None:
    """The fork server's loop: fork a child per request, report its pid, then its exit code and answer."""
    from app.worker.lifeline import die_with_parent

    die_with_parent(api_pid)  # first: an API killed now must not leave its validations running
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the API to handle
    to_api: BinaryIO = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to the log, not into the answers
    logging.basicConfig(level=logging.WARNING)
    os.nice(_NICE)  # here, not in each child: a child is born with it
    import app.services.uploads  # noqa: F401 - imported once here, so that every child starts with it

    # Importing onnxruntime starts one thread of its own; no session ever runs in this process, and children forked
    # from it create theirs as any process does (the test suite and a 576 MiB model ran so). Python 3.12 warns about
    # every fork of a process with threads: not this one's news.
    warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)

    def send(message: dict[str, Any]) -> None:
        to_api.write(json.dumps(message).encode() + b"\n")
        to_api.flush()

    server_pid, pending = os.getpid(), b""
    children: dict[int, dict[str, Any]] = {}  # pid -> {"id", "fd", "answer", "exit"}
    while True:
        reading = {child["fd"]: pid for pid, child in children.items() if child["fd"] is not None}
        ready, _, _ = select.select([0, *reading], [], [], _POLL_S if children else None)
        for fd in ready:
            if fd != 0:
                data = os.read(fd, 1 << 16)
                child = children[reading[fd]]
                if data:
                    child["answer"] += data
                else:
                    os.close(fd)
                    child["fd"] = None
                continue
            data = os.read(0, 1 << 16)
            if not data:
                return  # the API closed its end: it is gone or shutting down (the children die with this process)
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                message = json.loads(line)
                if message.get("kill"):
                    for pid, child in children.items():
                        if child["id"] == message["id"] and child["exit"] is None:
                            os.kill(pid, signal.SIGKILL)  # still unreaped: the pid is still this child's
                    continue
                read_fd, write_fd = os.pipe()
                pid = os.fork()
                if pid == 0:
                    others = [c["fd"] for c in children.values() if c["fd"] is not None]
                    for fd_open in [0, to_api.fileno(), read_fd, *others]:
                        os.close(fd_open)  # the child answers on its own pipe only
                    _child(message["request"], server_pid, write_fd)
                os.close(write_fd)
                children[pid] = {"id": message["id"], "fd": read_fd, "answer": b"", "exit": None}
                send({"id": message["id"], "pid": pid})
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # every child reaped already
                break
            if pid == 0:
                break
            if pid in children:
                children[pid]["exit"] = os.waitstatus_to_exitcode(status)
        for pid in [pid for pid, child in children.items() if child["exit"] is not None and child["fd"] is None]:
            child = children.pop(pid)
            send({"id": child["id"], "exit": child["exit"], "answer": child["answer"].decode()})


if __name__ == "__main__":
    serve(int(sys.argv[1]))

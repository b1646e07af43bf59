"""Serving benchmark: requests/s and p50/p99 latency of ways to serve one ONNX model on this machine.

Models: `small`, a tiny MLP (64-128-128-10; a run costs ~5 us: HTTP is nearly all of a request);
`rank`, a tabular/ranking MLP (256 features, two hidden layers of 1024, one score: 1.3M parameters;
a batch-1 run is a GEMV over 5 MB of weights, ~60 us, and a row costs ~12 us in a batch of 32, so
batching has something to save); `cnn`, a small CNN (3 Conv-BN-Relu blocks on a 64x64 image, ~0.8
ms a run, a row costs *more* in a batch); `mid`, a 2-layer transformer encoder (hidden 128, seq 32).
At concurrency 1, 8 and 32, side by side in one run:
  (a) ort         ONNX Runtime called directly in one process, one thread per concurrent caller (the limit)
  (b) fastapi     a minimal FastAPI endpoint calling session.run per request (JSON in/out; what users
                  write), in one process and in N (uvicorn --workers N)
  (c) v1          our /v1 predict (JSON), without and with dynamic batching
  (d) v2-binary   our /v2 infer with binary tensors, without and with dynamic batching, and with the
                  service's default (batching where a probe at load says it pays: see app/runtime/batching.py)
  (e) v2-binary   the same in N processes (`onnxforge serve --workers N`), without and with batching
"with batching" uploads each model with batch_max_size=32 (no probe; the batcher still adapts its
batch limit to what it times); "without" runs the service with ONNXFORGE_BATCH_MAX_SIZE=1; "default"
sets neither. Every server starts first; each round then measures every cell in turn (the machine is
shared: its load moves), and the table shows medians over rounds. The load comes from a separate
process: a small asyncio HTTP/1.1 keep-alive client (one connection per concurrent caller, the same
request body each time; ~0.15 of a core at 3000 requests/s), so the client costs little of the 2 cores.
Each cell also reports the server's CPU per request (all its threads and processes, from /proc): on a
loaded machine requests/s swings with the other processes' share of the cores, CPU per request far less.

    /work/venv/bin/python bench/serving.py [--seconds 2] [--rounds 3] [--concurrency 1 8 32]
        [--models small rank cnn mid] [--workers 2] [--only PREFIX ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402 - bench/ is on sys.path when run as a script

from optimizer.runtime import create_session  # noqa: E402
from tests import models  # noqa: E402

WARMUP_S = 0.5


MODELS = ("small", "rank", "cnn", "mid")


def _models() -> dict[str, tuple[object, dict[str, np.ndarray]]]:
    small = models.mlp()
    rank = models.mlp(features=256, hidden=1024, classes=1)
    cnn = models.cnn(channels=(16, 32, 64), image=64)
    mid = models.transformer(hidden=128, layers=2)
    return {
        "small": (small, models.random_feed(small, batch=1)),
        "rank": (rank, models.random_feed(rank, batch=1)),
        "cnn": (cnn, models.random_feed(cnn, batch=1)),
        "mid": (mid, models.random_feed(mid, batch=1, seq=32)),
    }


# -- the load generator (runs in its own process) ------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends the same prebuilt request again as soon as the
    previous answer is read; latency is request written -> response fully read.

    WHY a bare protocol on uvloop, not asyncio streams: on 2 cores the load generator's CPU is taken from
    the server it measures. Streams cost ~2.5x the CPU per request (a StreamReader, readuntil, a
    coroutine switch per await); wrk and hey are written in C for the same reason.
    """

    def __init__(self, request: bytes, start: float, stop: float, latencies: list[float],
                 done: asyncio.Future) -> None:
        self.request, self.start, self.stop, self.latencies, self.done = request, start, stop, latencies, done
        self.buffer = bytearray()
        self.need = -1  # bytes of the whole response, once its head is read
        self.sent_at = 0.0
        self.count = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.sent_at = time.perf_counter()
        if self.sent_at >= self.stop:
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
            return
        self.buffer.clear()
        self.need = -1
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            self.need = end + 4 + length
            if head[9:12] != b"200":
                self.done.set_exception(RuntimeError(f"HTTP {head[9:12].decode()}: {bytes(self.buffer[:300])!r}"))
                self.transport.close()
                return
        if len(self.buffer) >= self.need:
            if self.sent_at >= self.start:
                self.latencies.append(time.perf_counter() - self.sent_at)
            self.count += 1
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or RuntimeError("the server closed the connection"))


def _load_main(args: argparse.Namespace) -> None:
    """Write {"latencies": [...], "client_cpu_us": the generator's own CPU per request} as JSON to `args.out`
    (a file, not stdout: one run's output came back from the pipe with a stray line in it)."""
    import uvloop

    body = Path(args.body).read_bytes()
    headers = json.loads(args.headers)
    lines = [f"POST {args.path} HTTP/1.1", f"Host: {args.host}:{args.port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    latencies: list[float] = []

    async def main() -> int:
        loop = asyncio.get_running_loop()
        begin = time.perf_counter()
        start, stop = begin + WARMUP_S, begin + WARMUP_S + args.seconds
        connections = []
        for _ in range(args.concurrency):
            done = loop.create_future()
            _, protocol = await loop.create_connection(
                lambda done=done: _Connection(request, start, stop, latencies, done), args.host, args.port)
            connections.append(protocol)
        await asyncio.gather(*(c.done for c in connections))
        return sum(c.count for c in connections)

    cpu = time.process_time()
    requests = uvloop.run(main())
    cpu = time.process_time() - cpu
    Path(args.out).write_text(json.dumps({"latencies": latencies, "client_cpu_us": cpu / max(requests, 1) * 1e6}))


def _load(port: int, path: str, body: bytes, headers: dict[str, str], concurrency: int,
          seconds: float) -> tuple[list[float], float]:
    """(latencies, the load generator's CPU microseconds per request)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "body").write_bytes(body)
        subprocess.run(
            [sys.executable, __file__, "_load", "--port", str(port), "--path", path, "--body", f"{tmp}/body",
             "--out", f"{tmp}/out.json", "--headers", json.dumps(headers), "--concurrency", str(concurrency),
             "--seconds", str(seconds)],
            check=True, capture_output=True,
        )
        result = json.loads(Path(tmp, "out.json").read_text())
    return result["latencies"], result["client_cpu_us"]


# -- (a) ONNX Runtime in one process --------------------------------------------------------------------


def _direct(session, feed: dict[str, np.ndarray], concurrency: int,  # noqa: ANN001
            seconds: float) -> tuple[list[float], float]:
    latencies: list[float] = []
    begin = time.perf_counter()
    start, stop = begin + WARMUP_S, begin + WARMUP_S + seconds

    def loop() -> None:
        mine = []
        while (t0 := time.perf_counter()) < stop:
            session.run(None, feed)
            if t0 >= start:
                mine.append(time.perf_counter() - t0)
        latencies.extend(mine)

    threads = [threading.Thread(target=loop) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, float("nan")  # no load generator


# -- (b) the minimal FastAPI endpoint (runs in its own process) -----------------------------------------


def _minimal_app():  # noqa: ANN202 - a FastAPI app; uvicorn calls it in each process
    """What a user writes by hand: JSON lists in, session.run, JSON lists out."""
    from fastapi import FastAPI

    session = create_session(Path(os.environ["BENCH_MINIMAL_MODEL"]).read_bytes())
    app = FastAPI()

    @app.post("/predict")
    def predict(body: dict) -> dict:
        feed = {i.name: np.asarray(body["inputs"][i.name], dtype=np.int64 if "int64" in i.type else np.float32)
                for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        return {"outputs": {n: v.tolist() for n, v in zip(names, session.run(names, feed), strict=True)}}

    @app.get("/ready")
    def ready() -> dict:
        return {}

    return app


def _minimal_main(args: argparse.Namespace) -> None:
    """The minimal endpoint in `args.workers` processes (uvicorn's own --workers)."""
    import uvicorn

    os.environ["BENCH_MINIMAL_MODEL"] = args.model
    if args.workers > 1:  # uvicorn's processes import the app by name: this file, as module `serving`
        uvicorn.run("serving:_minimal_app", factory=True, workers=args.workers, host="127.0.0.1", port=args.port,
                    log_level="warning")
    else:
        uvicorn.run(_minimal_app(), host="127.0.0.1", port=args.port, log_level="warning")


# -- servers ---------------------------------------------------------------------------------------------


def _server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) of process `pid` and its descendants so far; nan off Linux.

    WHY: on a loaded machine a server's requests/s moves with the other processes' share of the cores (2-3x
    between rounds here at load 15), while the CPU it spends per request moves much less: a change to the
    request path shows up in it first."""
    total, todo = 0.0, [pid]
    try:
        tick = os.sysconf("SC_CLK_TCK")
        while todo:
            current = todo.pop()
            with contextlib.suppress(OSError):  # a child that just ended
                stat = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(stat[11]) + int(stat[12])) / tick
                for task in Path(f"/proc/{current}/task").iterdir():
                    todo += [int(child) for child in (task / "children").read_text().split()]
    except (OSError, ValueError):
        return float("nan")
    return total


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(command: list[str], ready_url: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited at start")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{command} did not become ready")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _ours(data_dir: Path, mode: str, onnx_models: dict, workers: int = 1) -> tuple[subprocess.Popen, int]:
    """Our service in `mode` "batch" (every model uploaded with batch_max_size=32), "nobatch" or "default",
    in `workers` API processes (`serve --workers`)."""
    port = _free_port()
    env = {**os.environ, "ONNXFORGE_RUN_WORKER": "false", "ONNXFORGE_LOG_LEVEL": "warning"}
    if mode == "nobatch":
        env["ONNXFORGE_BATCH_MAX_SIZE"] = "1"
    process = _start([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
                      "--workers", str(workers)], f"http://127.0.0.1:{port}/readyz", env)
    for name, (model, _) in onnx_models.items():
        if httpx.get(f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=30).status_code == 200:
            continue  # uploaded by the previous server on the same data folder
        files = {"file": ("model.onnx", model.SerializeToString(), "application/octet-stream")}
        fields = {"name": name, **({"batch_max_size": "32"} if mode == "batch" else {})}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/models", files=files, data=fields, timeout=60)
        response.raise_for_status()
        assert httpx.get(f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=30).status_code == 200
    return process, port


def _batch_counts(port: int, name: str) -> tuple[float, float, float]:
    """(runs, rows, runs of one row) the server has batched for model `name` so far, from its /metrics."""
    counts = {"count": 0.0, "sum": 0.0, "alone": 0.0}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text.splitlines():
        if not line.startswith("onnxforge_batch_size") or f'model="{name}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("onnxforge_batch_size_count"):
            counts["count"] += value
        elif line.startswith("onnxforge_batch_size_sum"):
            counts["sum"] += value
        elif line.startswith("onnxforge_batch_size_bucket") and 'le="1.0"' in line:
            counts["alone"] += value
    return counts["count"], counts["sum"], counts["alone"]


# -- requests --------------------------------------------------------------------------------------------


def _json_body(feed: dict[str, np.ndarray]) -> bytes:
    return json.dumps({"inputs": {k: v.tolist() for k, v in feed.items()}}).encode()


def _v2_binary(feed: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    dtypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    header = json.dumps({
        "inputs": [{"name": k, "shape": list(v.shape), "datatype": dtypes[v.dtype],
                    "parameters": {"binary_data_size": v.nbytes}} for k, v in feed.items()],
        "parameters": {"binary_data_output": True},
    }).encode()
    body = header + b"".join(np.ascontiguousarray(v).tobytes() for v in feed.values())
    return body, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


# -- in-process: the event loop's work per request, without HTTP -----------------------------------------


def _in_process(args: argparse.Namespace, onnx_models: dict) -> None:
    """Call our app's ASGI callable directly with a prebuilt scope, receive and send (no sockets, no HTTP
    parser): `args.requests` requests (/v2 binary infer, /v1 JSON predict) from max(concurrency) tasks on
    uvloop per cell, and per (model, batching, API, way) the wall time and the event-loop thread's CPU per
    request, medians over rounds. Ways: "fast path" is the app as served; "full stack" calls FastAPI's own
    __call__, i.e. every middleware and the router (what each request went through before app/fastpath.py)."""
    import uvloop
    from fastapi import FastAPI

    from app.main import create_app
    from app.settings import Settings

    c = max(args.concurrency)
    per_task = max(1, args.requests // c)
    samples: dict[tuple[str, str, str, str], list[tuple[float, float]]] = {}

    async def run(tmp: str) -> None:
        app = create_app(Settings(data_dir=Path(tmp), run_worker=False, log_level="warning"))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                for name, (model, _) in onnx_models.items():
                    for mode, size in (("nobatch", "1"), ("batch", "32")):
                        files = {"file": ("m.onnx", model.SerializeToString(), "application/octet-stream")}
                        fields = {"name": f"{name}-{mode}", "batch_max_size": size}
                        (await client.post("/v1/models", files=files, data=fields)).raise_for_status()
                        (await client.get(f"/v2/models/{name}-{mode}/ready")).raise_for_status()
            statuses: set[int] = set()

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    statuses.add(message["status"])

            ways = {"fast path": app, "full stack": functools.partial(FastAPI.__call__, app)}

            async def measure(round_: int, key: tuple[str, str, str, str], path: str, body: bytes,
                              headers: dict[str, str]) -> None:
                message = {"type": "http.request", "body": body, "more_body": False}

                async def receive() -> dict:
                    return message

                scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
                         "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
                         "raw_path": path.encode(), "root_path": "", "query_string": b"",
                         "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000), "state": {},
                         "headers": [(b"host", b"127.0.0.1:8000"), (b"content-length", str(len(body)).encode()),
                                     *((k.lower().encode(), v.encode()) for k, v in headers.items())]}
                call = ways[key[3]]

                async def task(k: int) -> None:
                    for _ in range(k):
                        await call(dict(scope), receive, send)  # a server builds a scope per request

                await asyncio.gather(*(task(20) for _ in range(c)))  # warm-up
                statuses.clear()
                wall, cpu = time.perf_counter(), time.thread_time()
                await asyncio.gather(*(task(per_task) for _ in range(c)))
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                assert statuses == {200}, statuses
                us = (wall / (per_task * c) * 1e6, cpu / (per_task * c) * 1e6)
                samples.setdefault(key, []).append(us)
                print(f"  round {round_} {' '.join(f'{k:<10}' for k in key)} wall {us[0]:6.1f} us/request  "
                      f"event loop CPU {us[1]:6.1f} us/request", flush=True)

            for round_ in range(1, args.rounds + 1):
                for name, (_, feed) in onnx_models.items():
                    requests = {"v2-bin": ("/v2/models/{}/infer", *_v2_binary(feed)),
                                "v1-json": ("/v1/models/{}/predict", _json_body(feed),
                                            {"Content-Type": "application/json"})}
                    for api, (template, body, headers) in requests.items():
                        for mode in ("nobatch", "batch"):
                            for way in ways:
                                await measure(round_, (name, mode, api, way), template.format(f"{name}-{mode}"),
                                              body, headers)

    with tempfile.TemporaryDirectory() as tmp:
        uvloop.run(run(tmp))
    print()
    print(f"machine: {describe()}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"in-process ASGI calls, {per_task * c} requests from {c} tasks per cell, {args.rounds} interleaved rounds, "
          f"medians; load average at the end: {os.getloadavg()[0]:.1f} (1 min)")
    print("| model  | batching | API     | way        | wall us/request | event loop CPU us/request |")
    print("|--------|----------|---------|------------|-----------------|---------------------------|")
    for (name, mode, api, way), values in samples.items():
        wall, cpu = (float(np.median([v[i] for v in values])) for i in range(2))
        print(f"| {name:<6} | {mode:<8} | {api:<7} | {way:<10} | {wall:15.1f} | {cpu:25.1f} |")


# -- the table -------------------------------------------------------------------------------------------


def _stats(latencies: list[float], seconds: float) -> tuple[float, float, float]:
    if not latencies:
        return 0.0, float("nan"), float("nan")
    ms = np.asarray(latencies) * 1000
    return len(ms) / seconds, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per cell (after 0.5 s warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every cell; the table shows medians")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--workers", type=int, default=2,
                        help="processes of the multi-process cells (minimal FastAPI and ours); 1 = none of them")
    parser.add_argument("--only", nargs="+", metavar="PREFIX", help="only the ways whose name starts so (e.g. d e)")
    parser.add_argument("--in-process", action="store_true",
                        help="instead: the event loop's CPU per /v2 and /v1 request, calling the app in-process "
                             "(no HTTP)")
    parser.add_argument("--requests", type=int, default=20000, help="requests per in-process cell")
    args = parser.parse_args()
    onnx_models = {k: v for k, v in _models().items() if k in args.models}
    if args.in_process:
        _in_process(args, onnx_models)
        return
    n = args.workers
    ways = ["a ort direct", "b fastapi minimal", "c v1 nobatch", "c v1 batch", "d v2-bin nobatch", "d v2-bin batch",
            "d v2-bin default"]
    if n > 1:
        ways += [f"b fastapi minimal x{n}", f"e v2-bin nobatch x{n}", f"e v2-bin batch x{n}"]
    if args.only:
        ways = [w for w in ways if w.startswith(tuple(args.only))]
    samples: dict[tuple[str, str, int], list[tuple[float, float, float, float, float]]] = {}
    batches: dict[tuple[str, str, int], list[tuple[float, float]]] = {}  # (rows a run, share of runs of one row)
    json_type = {"Content-Type": "application/json"}

    def record(kind: str, name: str, c: int, measured: tuple[list[float], float], round_: int,
               server_cpu_s: float) -> None:
        latencies, client_us = measured
        rps, p50, p99 = _stats(latencies, args.seconds)
        # the server's CPU over the whole load run, warm-up included: its requests counted at the measured rate
        server_us = server_cpu_s / max(rps * (args.seconds + WARMUP_S), 1) * 1e6
        samples.setdefault((kind, name, c), []).append((rps, p50, p99, client_us, server_us))
        print(f"  round {round_} {kind:<22} {name:<6} c={c:<3} {rps:9.0f} req/s  p50 {p50:7.2f} ms  "
              f"p99 {p99:7.2f} ms  load generator {client_us:5.1f} us CPU/request  server {server_us:5.1f} us "
              "CPU/request", flush=True)

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        # Every server is started first and idles while another is measured, so that each round measures
        # all ways of serving a (model, concurrency) one after the other: a change in the machine's load
        # (it is shared) then shows up as spread between rounds, not as a difference between servers.
        ports: dict[str, int | dict[str, int]] = {}
        pids: dict[tuple[str, str], int] = {}  # (way, model) -> the server's process
        for way in ways:
            if way.startswith("b "):
                workers = n if way.endswith(f"x{n}") else 1
                ports[way] = {}
                for name, (model, _) in onnx_models.items():
                    path = Path(tmp) / f"{name}.onnx"
                    path.write_bytes(model.SerializeToString())
                    port = _free_port()
                    server = _start([sys.executable, __file__, "_minimal", "--model", str(path), "--port", str(port),
                                     "--workers", str(workers)], f"http://127.0.0.1:{port}/ready")
                    servers.callback(_stop, server)
                    ports[way][name], pids[(way, name)] = port, server.pid
            elif way[0] in "cde":
                mode, workers = way.split()[2], n if way[0] == "e" else 1
                server_key = f"{mode} x{workers}"
                if server_key not in ports:  # /v1 and /v2 cells share one server per mode
                    server, ports[server_key] = _ours(Path(tmp) / f"data-{mode}-{workers}", mode, onnx_models,
                                                      workers)  # own folder: fields are stored
                    servers.callback(_stop, server)
                    pids.update({(server_key, name): server.pid for name in onnx_models})
                ports[way] = ports[server_key]
                pids.update({(way, name): pids[(server_key, name)] for name in onnx_models})
        cells = []
        for name, (model, feed) in onnx_models.items():
            session = create_session(model.SerializeToString())
            body, headers = _v2_binary(feed)
            for c in args.concurrency:
                for way in ways:
                    if way.startswith("a "):
                        measure = functools.partial(_direct, session, feed, c, args.seconds)
                    elif way.startswith("b "):
                        measure = functools.partial(_load, ports[way][name], "/predict", _json_body(feed), json_type,
                                                    c, args.seconds)
                    elif way.startswith("c "):
                        measure = functools.partial(_load, ports[way], f"/v1/models/{name}/predict", _json_body(feed),
                                                    json_type, c, args.seconds)
                    else:
                        measure = functools.partial(_load, ports[way], f"/v2/models/{name}/infer", body, headers, c,
                                                    args.seconds)
                    cells.append((way, name, c, measure))
        for round_ in range(1, args.rounds + 1):
            for kind, name, c, measure in cells:
                port = ports[kind] if kind.startswith("d v2-bin b") or kind.startswith("d v2-bin d") else None
                before = _batch_counts(port, name) if port else None
                pid = pids.get((kind, name), os.getpid())  # (a) runs ONNX Runtime in this process
                cpu = _server_cpu_s(pid)
                measured = measure()
                record(kind, name, c, measured, round_, _server_cpu_s(pid) - cpu)
                if port:  # how the batcher formed its runs in this cell (warm-up included)
                    runs, rows, alone = (a - b for a, b in zip(_batch_counts(port, name), before, strict=True))
                    batches.setdefault((kind, name, c), []).append((rows / max(runs, 1), alone / max(runs, 1)))
    results = {key: tuple(float(np.median([v[i] for v in values])) for i in range(5))
               for key, values in samples.items()}
    _print_table(args, onnx_models, ways, results)
    for (kind, name, c), values in batches.items():
        if c == max(args.concurrency):
            print(f"{name}: c={c} {kind}: {np.median([v[0] for v in values]):.1f} rows a run, "
                  f"{np.median([v[1] for v in values]):.0%} of runs of one row (medians over rounds)")


def _print_table(args: argparse.Namespace, onnx_models: dict, ways: list[str],
                 results: dict[tuple[str, str, int], tuple[float, float, float, float, float]]) -> None:
    print()
    print(f"machine: {describe()}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"{args.rounds} interleaved rounds of {args.seconds:g} s per cell after {WARMUP_S} s warm-up, medians; "
          f"latency = request sent to response read; load average at the end: {os.getloadavg()[0]:.1f} "
          f"(1 min), {os.getloadavg()[2]:.1f} (15 min)")
    print("cells: requests/s  p50/p99 ms; xN = N processes on one port (the rest: one process)")
    for name in onnx_models:
        print()
        header = f"| {name:<22} | " + " | ".join(f"{'c=' + str(c):<22}" for c in args.concurrency) + " |"
        print(header)
        print("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|")
        for way in ways:
            row = []
            for c in args.concurrency:
                rps, p50, p99 = results.get((way, name, c), (0.0, float("nan"), float("nan")))[:3]
                row.append(f"{rps:7.0f}/s {p50:6.2f}/{p99:6.2f}".ljust(22))
            print(f"| {way:<22} | " + " | ".join(row) + " |")
    print()
    n, top = args.workers, max(args.concurrency)
    for name in onnx_models:
        def rps(kind: str, name: str = name) -> float:
            return results.get((kind, name, top), (float("nan"),))[0]

        def ratio(a: str, b: str) -> str:
            return f"{rps(a) / rps(b):.2f}x" if rps(a) > 0 and rps(b) > 0 else "n/a"  # nan > 0 is False

        if 1 in args.concurrency and ("d v2-bin nobatch", name, 1) in results and ("a ort direct", name, 1) in results:
            gap = results[("d v2-bin nobatch", name, 1)][1] - results[("a ort direct", name, 1)][1]
            print(f"{name}: c=1 p50 of /v2 (no batching) minus ORT direct: {gap:+.2f} ms")
        print(f"{name}: c={top} one process:   /v2 batching/no batching {ratio('d v2-bin batch', 'd v2-bin nobatch')}, "
              f"batching/minimal FastAPI {ratio('d v2-bin batch', 'b fastapi minimal')}, default/no batching "
              f"{ratio('d v2-bin default', 'd v2-bin nobatch')}, default/minimal "
              f"{ratio('d v2-bin default', 'b fastapi minimal')}; /v1 batching/no batching "
              f"{ratio('c v1 batch', 'c v1 nobatch')}, /v1 batching/minimal {ratio('c v1 batch', 'b fastapi minimal')}")
        client = {w: results[(w, name, top)][3] for w in ways if (w, name, top) in results and w[0] != "a"}
        print(f"{name}: c={top} load generator CPU per request: "
              + ", ".join(f"{w} {us:.0f} us" for w, us in client.items()))
        server = {w: results[(w, name, top)][4] for w in ways if (w, name, top) in results and w[0] != "a"}
        print(f"{name}: c={top} server CPU per request (all its threads and processes): "
              + ", ".join(f"{w} {us:.0f} us" for w, us in server.items()))
        if n > 1:
            print(f"{name}: c={top} {n} processes: /v2 batching/no batching "
                  f"{ratio(f'e v2-bin batch x{n}', f'e v2-bin nobatch x{n}')}, batching/minimal FastAPI x{n} "
                  f"{ratio(f'e v2-bin batch x{n}', f'b fastapi minimal x{n}')}, batching/minimal FastAPI (1 process) "
                  f"{ratio(f'e v2-bin batch x{n}', 'b fastapi minimal')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_load", "_minimal"):
        sub = argparse.ArgumentParser()
        sub.add_argument("mode")
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int)
        sub.add_argument("--path")
        sub.add_argument("--body")
        sub.add_argument("--out")
        sub.add_argument("--headers", default="{}")
        sub.add_argument("--concurrency", type=int, default=1)
        sub.add_argument("--seconds", type=float, default=5.0)
        sub.add_argument("--model")
        sub.add_argument("--workers", type=int, default=1)
        parsed = sub.parse_args()
        (_load_main if parsed.mode == "_load" else _minimal_main)(parsed)
    else:
        main()

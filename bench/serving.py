"""Serving benchmark: requests/s and p50/p99 latency of ways to serve one ONNX model on this machine.

For two small models, an MLP (a run costs ~5 us: HTTP is nearly all of a request) and a small CNN
(3 Conv-BN-Relu blocks on a 64x64 image, ~0.5 ms a run), and a mid-size one (2-layer transformer
encoder, hidden 128, seq 32), at concurrency 1, 8 and 32, side by side in one run:
  (a) ort         ONNX Runtime called directly in one process, one thread per concurrent caller (the limit)
  (b) fastapi     a minimal FastAPI endpoint calling session.run per request (JSON in/out; what users write)
  (c) v1          our /v1 predict (JSON), without and with dynamic batching
  (d) v2-binary   our /v2 infer with binary tensors, without and with dynamic batching, and with the
                  service's default (batching where a probe at load says it pays: see app/runtime/batching.py)
"with batching" uploads each model with batch_max_size=32 (batching forced, no probe); "without" runs the
service with ONNXFORGE_BATCH_MAX_SIZE=1; "default" sets neither. Every server starts first; each round then
measures every cell in turn (the machine is shared: its load moves), and the table shows medians over rounds.
The load comes from a separate process: a small asyncio HTTP/1.1 keep-alive client (one connection per
concurrent caller, the same request body each time), so the client costs little of the 2 cores.

    /work/venv/bin/python bench/serving.py [--seconds 2] [--rounds 3] [--concurrency 1 8 32] [--models small cnn mid]
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


def _models() -> dict[str, tuple[object, dict[str, np.ndarray]]]:
    small = models.mlp()
    cnn = models.cnn(channels=(16, 32, 64), image=64)
    mid = models.transformer(hidden=128, layers=2)
    return {
        "small": (small, models.random_feed(small, batch=1)),
        "cnn": (cnn, models.random_feed(cnn, batch=1)),
        "mid": (mid, models.random_feed(mid, batch=1, seq=32)),
    }


# -- the load generator (runs in its own process) ------------------------------------------------------


async def _client(host: str, port: int, request: bytes, stop: float, start: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            if status != b"200":
                raise RuntimeError(f"HTTP {status.decode()}: {body[:300]!r}")
            t1 = time.perf_counter()
            if t0 >= start:
                latencies.append(t1 - t0)
    finally:
        writer.close()


def _load_main(args: argparse.Namespace) -> None:
    body = Path(args.body).read_bytes()
    headers = json.loads(args.headers)
    lines = [f"POST {args.path} HTTP/1.1", f"Host: {args.host}:{args.port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    latencies: list[float] = []
    begin = time.perf_counter()
    start, stop = begin + WARMUP_S, begin + WARMUP_S + args.seconds

    async def main() -> None:
        await asyncio.gather(*(_client(args.host, args.port, request, stop, start, latencies)
                               for _ in range(args.concurrency)))

    asyncio.run(main())
    print(json.dumps(latencies))


def _load(port: int, path: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float) -> list[float]:
    with tempfile.NamedTemporaryFile(suffix=".body") as file:
        file.write(body)
        file.flush()
        out = subprocess.run(
            [sys.executable, __file__, "_load", "--port", str(port), "--path", path, "--body", file.name,
             "--headers", json.dumps(headers), "--concurrency", str(concurrency), "--seconds", str(seconds)],
            check=True, capture_output=True, text=True,
        )
    return json.loads(out.stdout)


# -- (a) ONNX Runtime in one process --------------------------------------------------------------------


def _direct(session, feed: dict[str, np.ndarray], concurrency: int, seconds: float) -> list[float]:  # noqa: ANN001
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
    return latencies


# -- (b) the minimal FastAPI endpoint (runs in its own process) -----------------------------------------


def _minimal_main(args: argparse.Namespace) -> None:
    """What a user writes by hand: JSON lists in, session.run, JSON lists out."""
    import uvicorn
    from fastapi import FastAPI

    session = create_session(Path(args.model).read_bytes())
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

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# -- servers ---------------------------------------------------------------------------------------------


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


def _ours(data_dir: Path, mode: str, onnx_models: dict) -> tuple[subprocess.Popen, int]:
    """Our service in `mode` "batch" (every model uploaded with batch_max_size=32), "nobatch" or "default"."""
    port = _free_port()
    env = {**os.environ, "ONNXFORGE_RUN_WORKER": "false", "ONNXFORGE_LOG_LEVEL": "warning"}
    if mode == "nobatch":
        env["ONNXFORGE_BATCH_MAX_SIZE"] = "1"
    process = _start([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
                     f"http://127.0.0.1:{port}/readyz", env)
    for name, (model, _) in onnx_models.items():
        if httpx.get(f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=30).status_code == 200:
            continue  # uploaded by the previous server on the same data folder
        files = {"file": ("model.onnx", model.SerializeToString(), "application/octet-stream")}
        fields = {"name": name, **({"batch_max_size": "32"} if mode == "batch" else {})}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/models", files=files, data=fields, timeout=60)
        response.raise_for_status()
        assert httpx.get(f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=30).status_code == 200
    return process, port


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
    parser.add_argument("--models", nargs="+", default=["small", "cnn", "mid"], choices=["small", "cnn", "mid"])
    args = parser.parse_args()
    onnx_models = {k: v for k, v in _models().items() if k in args.models}
    samples: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
    json_type = {"Content-Type": "application/json"}

    def record(kind: str, name: str, c: int, latencies: list[float], round_: int) -> None:
        rps, p50, p99 = _stats(latencies, args.seconds)
        samples.setdefault((kind, name, c), []).append((rps, p50, p99))
        print(f"  round {round_} {kind:<18} {name:<6} c={c:<3} {rps:9.0f} req/s  p50 {p50:7.2f} ms  "
              f"p99 {p99:7.2f} ms", flush=True)

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        # Every server is started first and idles while another is measured, so that each round measures
        # all ways of serving a (model, concurrency) one after the other: a change in the machine's load
        # (it is shared) then shows up as spread between rounds, not as a difference between servers.
        minimal = {}
        for name, (model, _) in onnx_models.items():
            path = Path(tmp) / f"{name}.onnx"
            path.write_bytes(model.SerializeToString())
            port = _free_port()
            servers.callback(_stop, _start([sys.executable, __file__, "_minimal", "--model", str(path), "--port",
                                            str(port)], f"http://127.0.0.1:{port}/ready"))
            minimal[name] = port
        ours = {}
        for tag in ("nobatch", "batch", "default"):
            server, ours[tag] = _ours(Path(tmp) / f"data-{tag}", tag, onnx_models)  # own folder: fields are stored
            servers.callback(_stop, server)
        cells = []
        for name, (model, feed) in onnx_models.items():
            session = create_session(model.SerializeToString())
            body, headers = _v2_binary(feed)
            for c in args.concurrency:
                cells.append(("a ort direct", name, c, functools.partial(_direct, session, feed, c, args.seconds)))
                cells.append(("b fastapi minimal", name, c, functools.partial(
                    _load, minimal[name], "/predict", _json_body(feed), json_type, c, args.seconds)))
                for tag in ("nobatch", "batch"):
                    cells.append((f"c v1 {tag}", name, c, functools.partial(
                        _load, ours[tag], f"/v1/models/{name}/predict", _json_body(feed), json_type, c,
                        args.seconds)))
                for tag in ("nobatch", "batch", "default"):
                    cells.append((f"d v2-bin {tag}", name, c, functools.partial(
                        _load, ours[tag], f"/v2/models/{name}/infer", body, headers, c, args.seconds)))
        for round_ in range(1, args.rounds + 1):
            for kind, name, c, measure in cells:
                record(kind, name, c, measure(), round_)
    results = {key: tuple(float(np.median([v[i] for v in values])) for i in range(3))
               for key, values in samples.items()}

    kinds = sorted({k for k, _, _ in results})
    print()
    print(f"machine: {describe()}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"{args.rounds} interleaved rounds of {args.seconds:g} s per cell after {WARMUP_S} s warm-up, medians; "
          "latency = request sent to response read")
    print()
    header = f"| {'model':<6} | {'c':>3} | " + " | ".join(f"{k:<18}" for k in kinds) + " |"
    print(header)
    print("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|")
    for name in onnx_models:
        for c in args.concurrency:
            cells = []
            for kind in kinds:
                rps, p50, p99 = results.get((kind, name, c), (0.0, float("nan"), float("nan")))
                cells.append(f"{rps:6.0f}/s {p50:5.2f}/{p99:5.2f}".ljust(18))
            print(f"| {name:<6} | {c:>3} | " + " | ".join(cells) + " |")
    print("\ncells: requests/s  p50/p99 ms")
    for name in onnx_models:
        def rps(kind: str, c: int, name: str = name) -> float:
            return results.get((kind, name, c), (0.0,))[0]
        if 1 in args.concurrency:
            gap = results[("d v2-bin nobatch", name, 1)][1] - results[("a ort direct", name, 1)][1]
            print(f"{name}: c=1 p50 of /v2 (no batching) minus ORT direct: {gap:+.2f} ms")
        if 32 in args.concurrency:
            top = max(args.concurrency)
            minimal = rps("b fastapi minimal", top)
            for api in ("c v1", "d v2-bin"):
                batch, nobatch = rps(f"{api} batch", top), rps(f"{api} nobatch", top)
                print(f"{name}: c={top} {api}: batching/no batching {batch / max(nobatch, 1e-9):.2f}x, "
                      f"batching/minimal FastAPI {batch / max(minimal, 1e-9):.2f}x")
            default, nobatch = rps("d v2-bin default", top), rps("d v2-bin nobatch", top)
            print(f"{name}: c={top} d v2-bin: default/no batching {default / max(nobatch, 1e-9):.2f}x, "
                  f"default/minimal FastAPI {default / max(minimal, 1e-9):.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_load", "_minimal"):
        sub = argparse.ArgumentParser()
        sub.add_argument("mode")
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int)
        sub.add_argument("--path")
        sub.add_argument("--body")
        sub.add_argument("--headers", default="{}")
        sub.add_argument("--concurrency", type=int, default=1)
        sub.add_argument("--seconds", type=float, default=5.0)
        sub.add_argument("--model")
        parsed = sub.parse_args()
        (_load_main if parsed.mode == "_load" else _minimal_main)(parsed)
    else:
        main()

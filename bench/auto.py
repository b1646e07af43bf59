"""precision=auto on a mid-size CNN, detector and transformer (and on real models when bench/real_models.py
finds any): every candidate auto tried, and the winner with its speedup and accuracy.

    python bench/auto.py [--seconds 2] [--budget 600] [--samples 40] [--only NAME ...] [--no-built]

Per model: each candidate's p50 (final interleaved timing when it passed, else the probe's), its
ratio to the original, worst cosine / top-1 / worst slice cosine over the outputs, and status; then
the winner and the best *single recipe* that passes (what ONNX Runtime's tools give by hand, without
repair). Ratios, not absolute times, are what transfer between machines.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402 - bench/ is on sys.path when run as a script

from optimizer.auto import format_table, worst_accuracy  # noqa: E402
from optimizer.errors import OptimizerError  # noqa: E402
from optimizer.pipeline import OptimizeConfig, optimize  # noqa: E402
from tests import models  # noqa: E402

Feeds = Callable[[int, int], list[dict[str, np.ndarray]]]




def _built_feeds(model: onnx.ModelProto) -> Feeds:
    return lambda n, seed: [models.random_feed(model, batch=1, seq=32, seed=seed + i) for i in range(n)]


def subjects(include_built: bool) -> Iterator[tuple[str, bytes | str, Feeds]]:
    """(title, model bytes or path, feeds(n, seed)) for every model to run auto on."""
    if include_built:
        for title, model in (
            ("cnn (4 conv blocks, 64px)", models.cnn(seed=1, channels=(32, 64, 64, 128), image=64, classes=100)),
            ("detector (3 conv blocks, 64px, box+score head)", models.detector(seed=1, channels=(32, 64, 64),
                                                                                 image=64)),
            ("transformer (4 layers, 256 hidden, seq 32)", models.transformer(seed=1, hidden=256, heads=4, layers=4)),
        ):
            yield title, model.SerializeToString(), _built_feeds(model)
    try:
        from bench import real_models  # written for issue 2; optional
    except ImportError:
        return
    for real in real_models.available_models():
        yield f"{real.name} (real)", str(real.path), real.sample_feeds


def _npz(feeds: list[dict[str, np.ndarray]]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})
    return buffer.getvalue()


def _p50(row: dict[str, Any]) -> float | None:
    return row["latency_ms"]["p50"] if row.get("latency_ms") else None


def run_one(title: str, model: bytes | str, feeds: Feeds, args: argparse.Namespace) -> tuple[float, float]:
    """Print one model's table; return (auto's speedup, best single recipe's speedup) over the original."""
    started = time.perf_counter()
    sample_feeds = feeds(args.samples, 0)
    with tempfile.TemporaryDirectory() as out:
        config = OptimizeConfig(benchmark_seconds=args.seconds, batch_sizes=(1,), time_budget_s=args.budget,
                                auto_candidates=tuple(args.only) if args.only else None)
        report = optimize(model, out_dir=out, config=config, calibration=_npz(sample_feeds)).report
    auto = report["auto"]
    rows = auto["candidates"]
    base = _p50(next(r for r in rows if r["name"] == "original"))
    print(f"\n## {title}   ({time.perf_counter() - started:.0f}s)")
    print(format_table(report))
    singles = [r for r in rows if r["precision"] != "fp32" and "exclude_nodes" not in r["settings"]
               and r["status"] == "ok" and _p50(r)]
    best_single = min(singles, key=_p50, default=None)
    chosen = next(r for r in rows if r["name"] == report["selected"])
    speedup = base / _p50(chosen) if _p50(chosen) else 1.0
    single = base / _p50(best_single) if best_single else 1.0
    print(f"winner: {report['selected']} {speedup:.2f}x, {worst_accuracy(chosen.get('accuracy'))}; excluded nodes: "
          f"{auto['excluded_nodes']}; best single recipe that passes: "
          f"{best_single['name'] + f' {single:.2f}x' if best_single else 'none (FP32)'}")
    return speedup, single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="final timing, all passing variants interleaved")
    parser.add_argument("--budget", type=float, default=600.0, help="time_budget_s per model")
    parser.add_argument("--samples", type=int, default=40, help="samples (20%% held back for accuracy)")
    parser.add_argument("--only", nargs="*", help="probe only these candidate names")
    parser.add_argument("--no-built", action="store_true", help="only the real models")
    parser.add_argument("--models", nargs="*", help="only models whose title contains one of these")
    args = parser.parse_args()
    print(f"machine: {describe()}")
    print(f"command: python bench/auto.py {' '.join(sys.argv[1:])}")
    results = {}
    for title, model, feeds in subjects(not args.no_built):
        if args.models and not any(m in title for m in args.models):
            continue
        try:
            results[title] = run_one(title, model, feeds, args)
        except OptimizerError as exc:  # a model the optimizer refuses is a line in the table, not the end
            print(f"\n## {title}\nrefused: {exc}")
    print("\n## summary (speedup of p50 over the original at batch 1, strict default accuracy gate)")
    for title, (auto_x, single_x) in results.items():
        print(f"{title:50} auto {auto_x:5.2f}x   best single recipe {single_x:5.2f}x")
    if results:
        geo = math.exp(sum(math.log(a) for a, _ in results.values()) / len(results))
        print(f"geometric mean of auto's speedup: {geo:.2f}x")


if __name__ == "__main__":
    main()

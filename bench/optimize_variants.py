"""Each recipe of the optimizer on a mid-size CNN and transformer, timed side by side with FP32.

    python bench/optimize_variants.py [--seconds 2]

Builds the models here (weights fixed by seed), runs `optimizer.pipeline.optimize` once per recipe
(fp32 fuse, fp16, int8 dynamic, int8 static MinMax/Entropy/Percentile) and prints, per variant: size,
nodes, p50 latency, the ratio to the original measured in the same interleaved run, and accuracy on
held-back samples. Ratios, not absolute times, are what transfer between machines.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402 - bench/ is on sys.path when run as a script

from optimizer.pipeline import OptimizeConfig, optimize  # noqa: E402
from tests import models  # noqa: E402

RECIPES = [
    ("fp32", {"precision": "fp32"}),
    ("fp16", {"precision": "fp16"}),
    ("int8 dynamic", {"precision": "int8", "int8_mode": "dynamic"}),
    ("int8 static minmax", {"precision": "int8", "int8_mode": "static", "calibration_method": "minmax"}),
    ("int8 static entropy", {"precision": "int8", "int8_mode": "static", "calibration_method": "entropy"}),
    ("int8 static percentile", {"precision": "int8", "int8_mode": "static", "calibration_method": "percentile"}),
]




def calibration_npz(model, samples: int) -> bytes:
    feeds = [models.random_feed(model, batch=1, seq=32, seed=i) for i in range(samples)]
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per batch size, all variants interleaved")
    parser.add_argument("--samples", type=int, default=40)
    args = parser.parse_args()
    subjects = {
        "cnn (4 conv blocks, 64px)": models.cnn(seed=1, channels=(32, 64, 64, 128), image=64, classes=100),
        "transformer (4 layers, 256 hidden, seq 32)": models.transformer(seed=1, hidden=256, heads=4, layers=4),
    }
    print(f"machine: {describe()}")
    print(f"command: python bench/optimize_variants.py --seconds {args.seconds} --samples {args.samples}\n")
    print(f"{'model':44} {'recipe':24} {'variant':36} {'status':9} {'KiB':>8} {'nodes':>6} {'p50 ms':>8} "
          f"{'vs orig':>8} {'cosine':>8}")
    for title, model in subjects.items():
        npz = calibration_npz(model, args.samples)
        for recipe, settings in RECIPES:
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                config = OptimizeConfig(benchmark_seconds=args.seconds, batch_sizes=(1,), time_budget_s=900,
                                        **settings)
                report = optimize(model.SerializeToString(), out_dir=out, config=config, calibration=npz).report
            base = next(v for v in report["variants"] if v["name"] == "original")["latency_ms"]["p50"]
            for v in report["variants"]:
                if v["name"] == "original" and recipe != "fp32":
                    continue
                p50 = v["latency_ms"]["p50"] if v.get("latency_ms") else None
                cos = [o.get("cosine") for o in (v.get("accuracy") or {}).get("outputs", {}).values()]
                cos = [c for c in cos if c is not None]
                print(f"{title:44} {recipe:24} {v['name'] + ('*' if v['name'] == report['selected'] else ''):36} "
                      f"{v['status']:9} {v['size_bytes'] / 1024:8.0f} {v['node_count']:6d} "
                      f"{p50 if p50 is not None else float('nan'):8.3f} "
                      f"{(base / p50 if p50 else float('nan')):7.2f}x {min(cos) if cos else float('nan'):8.4f}")
            print(f"{'':44} {'':24} (selected {report['selected']}, {time.perf_counter() - started:.0f}s)")
    print("\n* = the variant the pipeline would serve; 'vs orig' = original p50 / variant p50, same interleaved run")


if __name__ == "__main__":
    main()

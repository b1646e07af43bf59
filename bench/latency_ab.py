"""A/A sanity check of optimizer.latency: the same model built twice must time at a ratio near 1.0.

Builds a CNN twice and an MLP twice (tests/models.py builders, fixed seeds), measures each pair side by
side with `measure_batches` (interleaved, spinning off) at batch 1 and 8, and prints p50/p90/p99 and
the B/A ratio of p50 with the machine and the command. A ratio far from 1.0 means the timing is biased.

    /work/venv/bin/python bench/latency_ab.py [--seconds 2] [--threads 0]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402 - bench/ is on sys.path when run as a script

from optimizer.latency import measure_batches  # noqa: E402
from optimizer.runtime import SessionSettings  # noqa: E402
from tests.models import cnn, mlp, random_feed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per pair and batch size")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    args = parser.parse_args()
    settings = SessionSettings(intra_op_threads=args.threads)

    print(f"machine: {describe()}")
    print(f"command: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"settings: provider={settings.provider} intra_op_threads={settings.intra_op_threads} "
          f"optimization_level={settings.optimization_level}; allow_spinning off (measure forces it)\n")

    pairs = {
        "cnn 32-64-64 @64px": lambda: cnn(seed=0, channels=(32, 64, 64), image=64),
        "mlp 256-512": lambda: mlp(seed=0, features=256, hidden=512),
    }
    header = (f"{'model':<20} {'batch':>5} {'side':>4} {'runs':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
              f"{'B/A p50':>8}")
    print(header)
    print("-" * len(header))
    for label, build in pairs.items():
        a, b = build(), build()  # built twice from the same seed: identical models, separate bytes
        results = measure_batches({"A": a.SerializeToString(), "B": b.SerializeToString()},
                                  random_feed(a, batch=1), settings, target_seconds=args.seconds)
        for batch, stats in results.items():
            ratio = stats["B"].p50_ms / stats["A"].p50_ms
            for side in ("A", "B"):
                s = stats[side]
                tail = f"{ratio:>8.3f}" if side == "B" else ""
                print(f"{label:<20} {batch:>5} {side:>4} {s.runs:>5} {s.p50_ms:>9.3f} {s.p90_ms:>9.3f} "
                      f"{s.p99_ms:>9.3f} {tail}")
    print("\nB/A p50 near 1.000 (within a few %) means the side-by-side timing is unbiased.")


if __name__ == "__main__":
    main()

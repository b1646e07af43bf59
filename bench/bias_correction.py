"""Static INT8 with and without bias correction (optimizer/passes/bias_correction.py), on the real CNNs.

    python bench/bias_correction.py [--models ocr_det layout_cdla ...] [--samples 40] [--modes local sequential]
                                    [--eq 0.5,4,4] [--recipes qdq-u8-heavy qdq-u8-all] [--seconds 2]

Per model and recipe (MinMax ranges, QDQ U8S8, per-channel weights), each built from the fused FP32
model and from its equalized twin (optimizer/passes/equalize.py, `--eq`), then bias-corrected against
the float model it was built from (`+bc-loc`: each node's own shift; `+bc-seq`: level by level, with
the quantized graph upstream): the worst output cosine, worst slice cosine, worst slice
error (share of the slice's range), the strict gate's verdict, the task metric's verdict where the model
declares one, and the p50 ratio to the fused FP32 model, timed interleaved in one run (spinning off).
Accuracy is measured against the uploaded model's outputs on held-back samples, as auto does; the bias
correction sees the calibration samples only. Structure copied from bench/equalize.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402 - bench/ is on sys.path when run as a script

from bench import real_models  # noqa: E402
from bench.judging import judge  # noqa: E402
from optimizer.accuracy import run_outputs  # noqa: E402
from optimizer.calibration import split_holdout  # noqa: E402
from optimizer.candidates import HEAVY_OPS  # noqa: E402
from optimizer.errors import OptimizerError  # noqa: E402
from optimizer.latency import measure  # noqa: E402
from optimizer.passes import bias_correction, cleanup, equalize, int8_static  # noqa: E402
from optimizer.runtime import SessionSettings, create_session  # noqa: E402

RECIPES = {  # name: (format, activation type, op types)
    "qdq-u8-heavy": ("qdq", "uint8", HEAVY_OPS),
    "qdq-u8-all": ("qdq", "uint8", None),
}
DEFAULT_MODELS = ("ocr_det", "layout_cdla", "nudenet", "ocr_rec")


def bench_model(real: real_models.RealModel, args: argparse.Namespace) -> None:
    original = onnx.load(str(real.path))
    notes: list[str] = []
    calibration, holdout = split_holdout(real.sample_feeds(args.samples), 0.2, 4, 0, notes)
    reference = run_outputs(create_session(original.SerializeToString(), SessionSettings()), holdout)
    fused = cleanup.run(original, cleanup.CleanupConfig(), feed=holdout[0]).model
    sources = {"": fused}
    for spec in args.eq:
        alpha, min_spread, output_spread = (float(v) for v in spec.split(","))
        config = equalize.EqualizeConfig(alpha=alpha, min_spread=min_spread, output_spread=output_spread or None)
        try:
            sources[f"+eq[{spec}]"] = equalize.run(fused, config, calibration, holdout[0]).model
        except OptimizerError as exc:
            print(f"  +eq[{spec}]: {exc}", flush=True)
    shared = int8_static.SharedCalibration()
    built: dict[str, onnx.ModelProto] = {"fp32": fused}
    rows: dict[str, dict[str, Any]] = {"fp32": judge(fused, reference, holdout, real.task_metrics)}
    for recipe in args.recipes:
        quant_format, act, op_types = RECIPES[recipe]
        config = int8_static.Int8StaticConfig(quant_format=quant_format, activation_type=act, op_types=op_types)
        for suffix, source in sources.items():
            name = recipe + suffix
            try:
                built[name] = int8_static.run(source, config, calibration, holdout[0], shared).model
            except OptimizerError as exc:
                print(f"  {name}: {exc}")
                continue
            rows[name] = judge(built[name], reference, holdout, real.task_metrics)
            for mode in args.modes:
                started = time.perf_counter()
                label = f"{name}+bc-{mode[:3]}"
                try:
                    corrected = bias_correction.run(built[name], bias_correction.BiasCorrectionConfig(mode=mode),
                                                    source, calibration, holdout[0])
                except OptimizerError as exc:
                    print(f"  {label}: {exc}")
                    continue
                print(f"  {label}: {corrected.changes} ({time.perf_counter() - started:.1f} s)", flush=True)
                built[label] = corrected.model
                rows[label] = judge(corrected.model, reference, holdout, real.task_metrics)
    settings = SessionSettings(allow_spinning=False)
    stats = measure({k: m.SerializeToString() for k, m in built.items()}, holdout[0], settings,
                    target_seconds=args.seconds * len(built))
    base = stats["fp32"].p50_ms
    print(f"  {'variant':<34} {'cosine':>8} {'slice':>8} {'s.err':>6} {'strict':>6} {'task':>5} {'p50 ms':>8} "
          f"{'x fp32':>7}")
    for name, row in rows.items():
        task = "-" if "task" not in row else ("pass" if row["task"] else "FAIL")
        print(f"  {name:<34} {row['cos']:8.4f} {row['slice']:8.3f} {row['err']:6.1%} "
              f"{'pass' if row['strict'] else 'FAIL':>6} {task:>5} {stats[name].p50_ms:8.2f} "
              f"{base / stats[name].p50_ms:7.2f}  {row['why'][:80]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--samples", type=int, default=40, help="samples (20%% held back for accuracy)")
    parser.add_argument("--modes", nargs="*", default=["local", "sequential"], choices=["local", "sequential"],
                        help="bias correction modes (BiasCorrectionConfig.mode), one +bc variant each")
    parser.add_argument("--eq", nargs="*", default=["0.5,4,4"],
                        help="alpha,min_spread,output_spread per equalized source (EqualizeConfig)")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seconds", type=float, default=2.0, help="timing seconds per variant")
    args = parser.parse_args()
    np.seterr(all="ignore")
    print(describe())
    print("command: python bench/bias_correction.py " + " ".join(sys.argv[1:]))
    for real in real_models.requested(args.models):
        print(f"{real.name}:", flush=True)
        bench_model(real, args)


if __name__ == "__main__":
    main()

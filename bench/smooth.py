"""Does SmoothQuant-style smoothing (optimizer/passes/smooth.py) rescue INT8 on real MatMul models? Side by side.

    python bench/smooth.py [--models minilm ocr_rec] [--alphas 0.5 0.75] [--seconds 20] [--samples 40]
                           [--float NODE ...]

Per model, on the fused FP32 model (what precision=auto quantizes): dynamic S8 per-channel and static MinMax
QDQ U8S8 on Conv/MatMul/Gemm, each without smoothing, with smoothing of LayerNorm outputs (the paper's recipe)
folded into the LayerNorm only, with a Mul where it cannot be folded, and with every activation smoothed (Mul
where no producer absorbs it), at each alpha; `--float` keeps the named nodes in float in every quantized row
(e.g. what auto's repair chose). Columns: worst output cosine, worst channel-slice cosine (the strict gate:
cosine >= 0.99, slices >= 0.98), whether the strict and the task gate (bench/real_models.py task_metrics)
pass, and p50 at batch 1 as a ratio to the original FP32, from one interleaved timing of all rows of the
model (spinning off). Needs `python bench/real_models.py fetch`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402 - bench/ is on sys.path when run as a script

from bench import real_models  # noqa: E402
from bench.judging import worst  # noqa: E402
from optimizer.accuracy import Tolerance, compare, run_outputs  # noqa: E402
from optimizer.calibration import split_holdout  # noqa: E402
from optimizer.candidates import HEAVY_OPS  # noqa: E402
from optimizer.errors import PassError  # noqa: E402
from optimizer.latency import measure  # noqa: E402
from optimizer.passes import cleanup, int8_dynamic, int8_static, smooth  # noqa: E402
from optimizer.runtime import SessionSettings, create_session  # noqa: E402


def run_model(real: real_models.RealModel, alphas: list[float], seconds: float, samples: int,
              in_float: tuple[str, ...]) -> None:
    original = onnx.load(str(real.path))
    calibration, holdout = split_holdout(real.sample_feeds(samples, 0), 0.2, 4, 0, [])
    fused = cleanup.run(original, cleanup.CleanupConfig(provider="cpu"), feed=holdout[0]).model
    reference = run_outputs(create_session(original.SerializeToString()), holdout)
    prepared, shared = int8_dynamic.Preprocessed(), int8_static.SharedCalibration()
    dynamic = int8_dynamic.Int8DynamicConfig(weight_type="int8", per_channel=True, nodes_to_exclude=in_float)
    static = int8_static.Int8StaticConfig(method="minmax", quant_format="qdq", activation_type="uint8",
                                          op_types=HEAVY_OPS, nodes_to_exclude=in_float)

    def quantizers(source: onnx.ModelProto) -> dict[str, Callable[[], onnx.ModelProto]]:
        return {"dynamic S8 pc": lambda: int8_dynamic.run(source, dynamic, holdout[0], prepared).model,
                "static QDQ U8S8 heavy": lambda: int8_static.run(source, static, calibration, holdout[0],
                                                                 shared).model}

    sources: dict[str, onnx.ModelProto] = {"": fused}
    for alpha in alphas:
        for scope, insert in (("norm", False), ("norm", True), ("all", True)):
            label = f" + SQ a{alpha} {scope}{' +Mul' if insert else ' fold'}"
            try:
                result = smooth.run(fused, smooth.SmoothConfig(alpha=alpha, scope=scope, insert_mul=insert),
                                    calibration, holdout[0])
            except PassError as exc:
                print(f"  {label}: {exc}")
                continue
            sources[label] = result.model
            print(f"  {label}: {result.changes['smoothed']}", flush=True)
    built = {"original FP32": original.SerializeToString(), "fused FP32": fused.SerializeToString()}
    rows: dict[str, tuple[float, float, bool, bool]] = {}
    strict, task = Tolerance(), Tolerance(metrics=dict(real.task_metrics))
    for suffix, source in sources.items():
        for recipe, make in quantizers(source).items():
            name = recipe + suffix
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    model = make()
            except PassError as exc:
                print(f"  {name}: {exc}")
                continue
            outputs = run_outputs(create_session(model.SerializeToString()), holdout)
            strict_report = compare(reference, outputs, strict)
            rows[name] = (*worst(strict_report)[:2], strict_report.passed, compare(reference, outputs, task).passed)
            built[name] = model.SerializeToString()
            print(f"  built {name}: cos {rows[name][0]:.4f} slice {rows[name][1]:.4f}", flush=True)
    load = os.getloadavg()[0]
    stats = measure(built, holdout[0], SessionSettings(allow_spinning=False), target_seconds=seconds, min_runs=30)
    base = stats["original FP32"].p50_ms
    print(f"\n{real.name}: load {load:.1f} before timing, {os.getloadavg()[0]:.1f} after; {len(calibration)} "
          f"calibration / {len(holdout)} held-back samples; task metrics {real.task_metrics or 'strict'}")
    print(f"{'variant':44} {'cosine':>7} {'slice':>7} {'strict':>6} {'task':>5} {'p50 ms':>7} {'vs FP32':>7}")
    for name in built:
        cos, sl, ok, task_ok = rows.get(name, (1.0, 1.0, True, True))
        print(f"{name:44} {cos:7.4f} {sl:7.4f} {'pass' if ok else 'FAIL':>6} {'pass' if task_ok else 'FAIL':>5} "
              f"{stats[name].p50_ms:7.2f} {base / stats[name].p50_ms:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["minilm", "ocr_rec"])
    parser.add_argument("--alphas", nargs="*", type=float, default=[0.5, 0.75])
    parser.add_argument("--seconds", type=float, default=20.0, help="interleaved timing of one model's rows")
    parser.add_argument("--samples", type=int, default=40, help="samples (20%% held back for accuracy)")
    parser.add_argument("--float", nargs="*", default=[], help="nodes every quantized row keeps in float (a repair's)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    print(f"machine: {describe()}\ncommand: python bench/smooth.py {' '.join(sys.argv[1:])}")
    for real in real_models.available_models():
        if real.name in args.models:
            print(f"\n{real.name}", flush=True)
            run_model(real, args.alphas, args.seconds, args.samples, tuple(args.float))


if __name__ == "__main__":
    main()

"""Which INT8 kernels pay on this CPU: S8S8 vs U8S8 vs U8S8 with 7-bit weights (reduce_range), per real model.

    python bench/auto_avx2_kernels.py [--seconds 1.5] [--no-timing] MODEL ...   (bench/real_models.py list)

Each recipe is built once on the model as given (MinMax ranges shared, as auto shares them, on 24 samples),
judged on 16 others (worst output's cosine, top-1 agreement and worst slice cosine against FP32: accuracy
does not depend on the machine's load) and timed interleaved with the FP32 model; the speed figure is the
median of round-by-round ratios to FP32 with its 95% interval (optimizer.latency.paired_ratio), so load
that hits a round hits both runs. Why: on x86 without VNNI
ONNX Runtime's U8S8 kernels sum u8*s8 pairs in int16 (vpmaddubsw) and S8S8 has no fast kernel; auto's grid
(optimizer.candidates.auto_plan) adds "-rr" twins and holds S8S8 back there on the strength of these figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import real_models  # noqa: E402
from bench.judging import print_speedups  # noqa: E402
from bench.machine import describe  # noqa: E402
from optimizer.accuracy import compare, run_outputs  # noqa: E402
from optimizer.calibration import SampleSet  # noqa: E402
from optimizer.candidates import HEAVY_OPS, Candidate, dynamic_candidate, static_candidate  # noqa: E402
from optimizer.passes import int8_dynamic, int8_static  # noqa: E402
from optimizer.runtime import create_session  # noqa: E402


def recipes(kind: str) -> list[Candidate]:
    """U8S8, its 7-bit twin and S8S8, per format and scope; dynamic S8/S8-rr/U8 first for MatMul models."""
    prepared = int8_dynamic.Preprocessed()
    shared = int8_static.SharedCalibration(prepared)
    static = [static_candidate("minmax", fmt, act, scope, shared=shared, reduce_range=rr)
              for scope in (HEAVY_OPS, None) for fmt in ("qdq", "qoperator")
              for act, rr in (("uint8", False), ("uint8", True), ("int8", False))]
    if kind not in ("transformer", "rnn"):
        return static
    return [dynamic_candidate("int8", prepared=prepared), dynamic_candidate("int8", prepared=prepared,
                                                                            reduce_range=True),
            dynamic_candidate("uint8", prepared=prepared), *static[:3]]


def accuracy(model: bytes, samples: SampleSet, reference: list[dict]) -> str:
    """The worst output's cosine, top-1 agreement and slice cosine against FP32 on the held-back samples."""
    outputs = compare(reference, run_outputs(create_session(model), samples.holdout)).to_dict()["outputs"].values()
    parts = []
    for label, value in (("cos", [o.get("cosine") for o in outputs]), ("top1", [o.get("top1") for o in outputs]),
                         ("slice", [(o.get("slices") or {}).get("worst_cosine") for o in outputs])):
        known = [v for v in value if v is not None]
        if known:
            parts.append(f"{label} {min(known):.4f}")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--seconds", type=float, default=1.5, help="timing per variant (all interleaved)")
    parser.add_argument("--no-timing", action="store_true", help="accuracy only")
    args = parser.parse_args()
    print(f"machine: {describe()}")
    for real in real_models.available_models():
        if real.name not in args.models:
            continue
        model = onnx.load(str(real.path))
        feeds = real.sample_feeds(40, 0)
        samples = SampleSet(calibration=feeds[:24], holdout=feeds[24:], synthetic=False, source="bench")
        timed = {"fp32": model.SerializeToString()}
        reference = run_outputs(create_session(timed["fp32"]), samples.holdout)
        judged = {}
        print(f"## {real.name}", flush=True)
        for candidate in recipes(real.kind):
            try:
                timed[candidate.name] = candidate.build(model, samples).model.SerializeToString()
                judged[candidate.name] = accuracy(timed[candidate.name], samples, reference)
            except Exception as exc:  # noqa: BLE001 - a tool failure is a line, not the end
                timed.pop(candidate.name, None)
                print(f"  {candidate.name:48} failed: {str(exc)[:100]}")
                continue
            if args.no_timing:
                print(f"  {candidate.name:48} {judged[candidate.name]}", flush=True)
        if args.no_timing:
            continue
        print_speedups(timed, feeds[24], judged, args.seconds, 48)


if __name__ == "__main__":
    main()

"""Levers against INT8 accuracy loss on the CNNs at the strict gate, side by side with plain MinMax.

    python bench/int8_levers.py [--calibration 64] [--holdout 268] [--seconds 1.0] [--no-timing] MODEL ...

Per model, static QDQ/QOperator U8S8 heavy-op (Conv/MatMul/Gemm) and all-op builds with:
  minmax  ORT's MinMax ranges (auto's probe);
  mse     each activation's range chosen to minimise its own quantisation error (uint8, asymmetric) over a
          histogram of the calibration activations: ORT's MinMax, Percentile and Entropy apply one rule to every
          tensor (keep all, clip a fixed share, match a distribution), none of them the tensor's own rounding +
          clipping error, which is what a uint8 grid on a long-tailed activation trades.
--equalize applies auto's "-eq" Conv channel equalization (optimizer/passes/equalize.py) first.
Ranges are handed to quantize_static as TensorQuantOverrides (rmin/rmax), so everything else is ORT's own.
Printed per recipe: the strict gate's verdict (optimizer.accuracy.compare's defaults), worst output cosine,
top-1 agreement with its 95% lower bound and disagreeing rows, and the median round-by-round latency ratio to
FP32 with its 95% interval (optimizer.latency.paired_ratio).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import real_models  # noqa: E402
from bench.judging import print_speedups  # noqa: E402
from bench.machine import describe  # noqa: E402
from optimizer.accuracy import compare, run_outputs  # noqa: E402
from optimizer.candidates import EQUALIZE, HEAVY_OPS  # noqa: E402
from optimizer.passes import cleanup, equalize, int8_static  # noqa: E402
from optimizer.runtime import create_session  # noqa: E402

Feed = dict[str, np.ndarray]
BINS = 2048


def preprocessed(model: onnx.ModelProto, feed: Feed) -> onnx.ModelProto:
    """The model quantize_static sees (opset for per-channel, quant_pre_process): tensor names to override."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = int8_static._prepare(model, True, Path(tmp), feed)  # noqa: SLF001 - same source as the pass
    return onnx.load_from_string(prepared.model_bytes)


def activation_tensors(model: onnx.ModelProto, op_types: Sequence[str] | None) -> list[str]:
    """Float tensors read or written by the nodes in scope (None: every node), initializers left out."""
    inits = {t.name for t in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    out: list[str] = []
    for node in model.graph.node:
        if op_types is not None and node.op_type not in op_types:
            continue
        for name in [*node.input, *node.output]:
            if name and name not in inits and name in floats and name not in out:
                out.append(name)
    return out


def collect(model: onnx.ModelProto, tensors: list[str], feeds: Sequence[Feed]) -> dict[str, tuple]:
    """Per tensor: (min, max, histogram counts, bin edges) over all calibration feeds (two passes)."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    known = {o.name for o in augmented.graph.output}
    for name in tensors:
        if name not in known:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    lows = dict.fromkeys(tensors, np.inf)
    highs = dict.fromkeys(tensors, -np.inf)
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            lows[name] = min(lows[name], float(value.min()))
            highs[name] = max(highs[name], float(value.max()))
    hists = {n: np.zeros(BINS, np.int64) for n in tensors}
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, feed), strict=True):
            lo, hi = min(lows[name], 0.0), max(highs[name], 0.0)
            hists[name] += np.histogram(value, bins=BINS, range=(lo, hi if hi > lo else lo + 1e-6))[0]
    return {n: (lows[n], highs[n], hists[n], np.linspace(min(lows[n], 0.0), max(highs[n], 0.0), BINS + 1))
            for n in tensors}


def mse_range(low: float, high: float, counts: np.ndarray, edges: np.ndarray,
              grid: int = 48) -> tuple[float, float, float]:
    """The (rmin, rmax) inside [low, high] whose uint8 asymmetric grid gives the least squared error over the
    histogram (bin centres, weighted by counts); returns it and its error relative to MinMax's."""
    centres = (edges[:-1] + edges[1:]) / 2
    weights = counts.astype(np.float64)

    def error(rmin: float, rmax: float) -> float:
        rmin, rmax = min(rmin, 0.0), max(rmax, 0.0)
        if rmax - rmin <= 0:
            return float(np.sum(weights * centres**2))
        scale = (rmax - rmin) / 255
        zero = np.round(-rmin / scale)
        q = np.clip(np.round(centres / scale) + zero, 0, 255)
        return float(np.sum(weights * ((q - zero) * scale - centres) ** 2))

    base = error(low, high)
    best = (base, low, high)
    shrink = np.linspace(1.0, 0.05, grid)
    for a in shrink if low < 0 else [1.0]:
        for b in shrink if high > 0 else [1.0]:
            e = error(low * a, high * b)
            if e < best[0]:
                best = (e, low * a, high * b)
    return best[1], best[2], best[0] / base if base else 1.0


def overrides(stats: dict[str, tuple], verbose: bool) -> dict[str, list[dict[str, np.float32]]]:
    result = {}
    for name, (low, high, counts, edges) in stats.items():
        rmin, rmax, rel = mse_range(low, high, counts, edges)
        result[name] = [{"rmin": np.float32(min(rmin, 0.0)), "rmax": np.float32(max(rmax, 0.0))}]
        if verbose and rel < 0.7:
            print(f"    mse {name[-60:]:60} [{low:9.3g},{high:9.3g}] -> [{rmin:9.3g},{rmax:9.3g}] err x{rel:.2f}")
    return result


def accuracy(model: bytes, holdout: Sequence[Feed], reference: list[dict]) -> str:
    report = compare(reference, run_outputs(create_session(model), holdout))
    outputs = report.to_dict()["outputs"]
    parts = ["strict PASS" if report.passed else f"strict fail ({(report.reason or '')[:90]})"]
    cos = [o.get("cosine") for o in outputs.values() if o.get("cosine") is not None]
    if cos:
        parts.append(f"cos {min(cos):.4f}")
    sl = [(o.get("slices") or {}).get("worst_cosine") for o in outputs.values()]
    sl = [v for v in sl if v is not None]
    if sl:
        parts.append(f"slice {min(sl):.4f}")
    for o in outputs.values():
        if o.get("top1") is not None:
            units = o.get("top1_units") or 0
            flips = round((1 - o["top1"]) * units)
            parts.append(f"top1 {o['top1']:.4f} (>= {o.get('top1_lower_95') or 0:.4f}, {flips}/{units} flips)")
    return " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--holdout", type=int, default=268)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--scopes", default="heavy,all")
    parser.add_argument("--formats", default="qdq,qoperator")
    parser.add_argument("--exclude", default="", help="comma-separated node names kept in float")
    parser.add_argument("--equalize", action="store_true", help="auto's Conv channel equalization first (-eq)")
    args = parser.parse_args()
    print(f"machine: {describe()}")
    for real in real_models.requested(args.models):
        model = onnx.load(str(real.path))
        feeds = real.sample_feeds(args.calibration + args.holdout, 0)
        calibration, holdout = feeds[: args.calibration], feeds[args.calibration:]
        timed = {"fp32": model.SerializeToString()}
        reference = run_outputs(create_session(timed["fp32"]), holdout)
        if args.equalize:  # FP32 unchanged (equalize checks it); the reference stays the given model's
            fused = cleanup.run(model, cleanup.CleanupConfig(), feed=calibration[0]).model  # BN folded, as auto
            model = equalize.run(fused, EQUALIZE, calibration, calibration[0]).model
        source = preprocessed(model, calibration[0])
        judged: dict[str, str] = {}
        print(f"## {real.name} ({args.calibration} calibration, {len(holdout)} held back)", flush=True)
        exclude = tuple(n for n in args.exclude.split(",") if n)
        for scope_name in args.scopes.split(","):
            scope = HEAVY_OPS if scope_name == "heavy" else None
            stats = collect(source, activation_tensors(source, scope), calibration)
            ranges = overrides(stats, verbose=True)
            for fmt in args.formats.split(","):
                for lever, extra in (("minmax", {}), ("mse", {"TensorQuantOverrides": ranges})):
                    name = f"{fmt}-u8s8-{scope_name}-{lever}"
                    config = int8_static.Int8StaticConfig(quant_format=fmt, activation_type="uint8", op_types=scope,
                                                          nodes_to_exclude=exclude, extra_options=extra)
                    try:
                        built = int8_static.run(model, config, calibration, calibration[0]).model
                    except Exception as exc:  # noqa: BLE001 - a tool failure is a line
                        print(f"  {name:32} failed: {str(exc)[:120]}", flush=True)
                        continue
                    timed[name] = built.SerializeToString()
                    judged[name] = accuracy(timed[name], holdout, reference)
                    print(f"  {name:32} {judged[name]}", flush=True)
        if args.no_timing:
            continue
        print_speedups(timed, holdout[0], judged, args.seconds, 32)


if __name__ == "__main__":
    main()

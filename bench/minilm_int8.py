"""What keeps MiniLM's dynamic INT8 from passing the strict gate: INT8 recipes side by side, one run.

    python bench/minilm_int8.py [--seconds 30] [--only SUBSTRING ...]

Each row is one ONNX Runtime quantize_dynamic / quantize_static run on the fused FP32 MiniLM (the source
precision=auto quantizes), or the fused model with some weights rounded to int8 and back in numpy (the
error of the weights alone, activations in float). Columns: worst channel-slice cosine and whole cosine
of the embedding against the original FP32 model on the held-back samples (the gate is >= 0.98 / 0.99),
and p50 latency at batch 1 from one interleaved timing of every row (optimizer.latency.measure), as a
ratio to the original. Needs `python bench/real_models.py fetch`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402 - bench/ is on sys.path when run as a script

from bench import real_models  # noqa: E402
from optimizer.accuracy import Tolerance, compare, run_outputs  # noqa: E402
from optimizer.calibration import split_holdout  # noqa: E402
from optimizer.latency import measure  # noqa: E402
from optimizer.passes import cleanup, int8_static  # noqa: E402
from optimizer.passes.int8_dynamic import pre_process  # noqa: E402
from optimizer.runtime import SessionSettings, create_session  # noqa: E402

LAYERS = 6


def _is_ffn_out(node: onnx.NodeProto) -> bool:
    return node.name.endswith("/output/dense/MatMul") and "attention" not in node.name


def rounded_weights(source: Path, select: Callable[[onnx.NodeProto], bool],
                    asymmetric: bool = False) -> onnx.ModelProto:
    """The float model with the selected MatMul/Attention weights rounded per output channel (int8 symmetric, or
    uint8 asymmetric) and back: the error the weights alone bring, with every activation in float."""
    model = onnx.load(source)
    names = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Attention") and select(n)}
    for tensor in model.graph.initializer:
        if tensor.name not in names:
            continue
        w = numpy_helper.to_array(tensor)
        if asymmetric:
            lo, hi = np.minimum(w.min(axis=0, keepdims=True), 0), np.maximum(w.max(axis=0, keepdims=True), 0)
            scale = (hi - lo) / 255.0
            zero = np.round(-lo / scale)
            rounded = (np.clip(np.round(w / scale) + zero, 0, 255) - zero) * scale
        else:
            scale = np.abs(w).max(axis=0, keepdims=True) / 127.0
            rounded = np.clip(np.round(w / scale), -127, 127) * scale
        tensor.CopyFrom(numpy_helper.from_array(rounded.astype(np.float32), tensor.name))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="interleaved timing of all rows together")
    parser.add_argument("--only", nargs="*", help="rows whose name contains one of these")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    real = next(r for r in real_models.available_models() if r.name == "minilm")
    original = onnx.load(str(real.path))
    calibration, holdout = split_holdout(real.sample_feeds(40, 0), 0.2, 4, 0, [])
    settings = SessionSettings()
    fused = cleanup.run(original, cleanup.CleanupConfig(provider="cpu"), feed=holdout[0]).model
    reference = run_outputs(create_session(original.SerializeToString(), settings), holdout)
    work = Path(tempfile.mkdtemp(prefix="minilm-int8-"))
    source, _ = pre_process(fused, work, "bench")
    ffn_out = [f"/bert/encoder/layer.{i}/output/dense/MatMul" for i in range(LAYERS)]
    ffn_out_weights = [n.input[1] for n in onnx.load(source, load_external_data=False).graph.node if _is_ffn_out(n)]
    shared = int8_static.SharedCalibration()

    def dynamic(weights: QuantType = QuantType.QInt8, **options) -> onnx.ModelProto:
        target = work / f"dynamic{len(os.listdir(work))}.onnx"
        extra = {"DefaultTensorType": TensorProto.FLOAT, **options.pop("extra", {})}
        quantize_dynamic(source, target, weight_type=weights, extra_options=extra,
                         per_channel=options.pop("per_channel", True), **options)
        return onnx.load(target)

    def static(**config) -> onnx.ModelProto:
        with contextlib.redirect_stdout(io.StringIO()):
            return int8_static.run(fused, int8_static.Int8StaticConfig(**config), calibration, holdout[0], shared).model

    u8_ffn_out = {w: [{"quant_type": QuantType.QUInt8, "axis": 1}] for w in ffn_out_weights}
    recipes: dict[str, Callable[[], onnx.ModelProto]] = {
        "weights only: S8 per-channel, all": lambda: rounded_weights(source, lambda n: True),
        "weights only: S8 per-channel, QKV (Attention)": lambda: rounded_weights(
            source, lambda n: n.op_type == "Attention"),
        "weights only: S8 per-channel, attention output": lambda: rounded_weights(
            source, lambda n: "attention/output" in n.name),
        "weights only: S8 per-channel, FFN intermediate": lambda: rounded_weights(
            source, lambda n: "intermediate" in n.name),
        "weights only: S8 per-channel, FFN output": lambda: rounded_weights(source, _is_ffn_out),
        "weights only: U8 asymmetric per-channel, all": lambda: rounded_weights(
            source, lambda n: True, asymmetric=True),
        "dynamic S8 per-channel (auto's)": lambda: dynamic(),
        "dynamic S8 per-channel reduce_range": lambda: dynamic(reduce_range=True),
        "dynamic S8 per-channel WeightSymmetric=False": lambda: dynamic(extra={"WeightSymmetric": False}),
        "dynamic S8 per-tensor": lambda: dynamic(per_channel=False),
        "dynamic U8 per-channel": lambda: dynamic(QuantType.QUInt8),
        "dynamic S8 pc, MatMul only (no QAttention/QEmbedLN)": lambda: dynamic(op_types_to_quantize=["MatMul"]),
        "dynamic S8 pc, MatMul+Attention (EmbedLN float)": lambda: dynamic(
            op_types_to_quantize=["MatMul", "Attention"]),
        "dynamic S8 pc, FFN-output weights U8 (TensorQuantOverrides)": lambda: dynamic(
            extra={"TensorQuantOverrides": u8_ffn_out}),
        "dynamic S8 pc, 6 FFN-output MatMuls in float": lambda: dynamic(nodes_to_exclude=ffn_out),
        "dynamic U8 pc, 6 FFN-output MatMuls in float": lambda: dynamic(QuantType.QUInt8, nodes_to_exclude=ffn_out),
        "static QDQ S8S8 pc MinMax, MatMul": lambda: static(activation_type="int8", op_types=("MatMul",)),
        "static QDQ U8S8 pc MinMax, MatMul": lambda: static(activation_type="uint8", op_types=("MatMul",)),
        "static QOperator U8S8 pc MinMax, all ops": lambda: static(activation_type="uint8", quant_format="qoperator"),
    }
    print(f"machine: {describe()}\ncommand: python bench/minilm_int8.py {' '.join(sys.argv[1:])}")
    built = {"original (FP32)": original.SerializeToString(), "fused (FP32)": fused.SerializeToString()}
    accuracy: dict[str, tuple[float, float]] = {name: (1.0, 1.0) for name in built}
    for name, make in recipes.items():
        if args.only and not any(part in name for part in args.only):
            continue
        model = make()
        report = compare(reference, run_outputs(create_session(model.SerializeToString(), settings), holdout),
                         Tolerance())
        output = report.outputs[next(iter(report.outputs))]
        worst = output.slices.worst_cosine if output.slices else None
        accuracy[name] = (float("nan") if worst is None else worst, output.cosine)
        built[name] = model.SerializeToString()
        print(f"built {name}: slice {accuracy[name][0]:.4f} cosine {accuracy[name][1]:.4f}", flush=True)
    load = os.getloadavg()[0]
    stats = measure(built, holdout[0], settings, target_seconds=args.seconds, min_runs=30)
    base = stats["original (FP32)"].p50_ms
    print(f"\nload average {load:.1f} before timing, {os.getloadavg()[0]:.1f} after; {len(holdout)} held-back samples")
    print(f"{'recipe':62} {'worst slice':>11} {'cosine':>7} {'p50 ms':>7} {'vs FP32':>7}")
    for name in built:
        slice_cos, cos = accuracy[name]
        print(f"{name:62} {slice_cos:11.4f} {cos:7.4f} {stats[name].p50_ms:7.2f} {base / stats[name].p50_ms:6.2f}x")


if __name__ == "__main__":
    main()

"""Block-wise weight quantization (com.microsoft MatMulNBits) vs fused FP32, per real model, at batch 1.

    python bench/matmul_nbits.py [--seconds 1.0] [--samples 40] [--no-timing] [--grid full|short] [--threads N] \
        MODEL ...

Why: per-channel INT8 fails the strict gate on several models here and gains little on this AVX2 CPU (no VNNI);
block-wise 4/8-bit weights are far more accurate. The question is whether ONNX Runtime's MatMulNBits kernels are
faster than FP32 for encoder-style graphs (M = sequence rows, not one LLM decode row).

Each model is fused first with the project's own pass (optimizer.passes.cleanup, as auto's "fused" candidate),
then every MatMulNBits setting (optimizer.passes.nbits: bits, block size, accuracy_level 0 = FP32 compute /
4 = int8 compute, symmetric or not) is built from the fused model. Accuracy: worst output cosine, worst channel
slice cosine, worst top-1 agreement and the strict gate's verdict (optimizer.accuracy defaults) on `--samples`
held-back feeds against the fused FP32 outputs. Speed: every variant, the fused model and an A/A control (the fused
model opened again) timed interleaved in one run (optimizer.latency.measure); each figure is the median of
round-by-round ratios to fused FP32 with its 95% interval (paired_ratio), and the A/A row is that run's noise.

Result on the AVX2 EPYC (no VNNI), ONNX Runtime 1.32, 2026-11-28: no setting both passes the strict gate and
beats fused FP32 beyond the A/A control on minilm, ocr_rec, magika or speaker_ge2e, at default or one thread.
4-bit: 0.93-1.01x (at best parity: for M > 1 the FP32-compute path dequantizes and runs the same SGEMM) and fails
the gate (MiniLM cosine 0.96-0.98, PP-OCR rec 0.98-0.99). 8-bit passes (cosine >= 0.9992) at 0.37-1.01x (MiniLM
0.37-0.79x). So auto has no MatMulNBits candidate.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import real_models  # noqa: E402
from bench.machine import describe  # noqa: E402
from optimizer.accuracy import Tolerance, compare, run_outputs  # noqa: E402
from optimizer.errors import PassError  # noqa: E402
from optimizer.latency import measure, paired_ratio  # noqa: E402
from optimizer.passes import cleanup  # noqa: E402
from optimizer.passes.base import PassResult, verify_runs  # noqa: E402
from optimizer.runtime import SessionSettings, create_session  # noqa: E402

FUSED = "fused fp32"

# ---------------------------------------------------------------- the MatMulNBits builder
# Kept in this script, not in optimizer/passes: no setting both passed the strict gate and beat fused FP32 here
# (the result in the module docstring), so auto has no candidate built on it.
# ONNX Runtime's own block quantizer (quantize_matmul_4bits / _8bits, the C++ functions its MatMulNBitsQuantizer
# calls) quantizes and packs each weight. The node rewrite is written here because that Python wrapper imports
# onnx_ir, which is not a dependency of this project (nor of onnxruntime), and rewrites MatMul only, while the fuse
# pass turns every MatMul + bias Add into Gemm: each Gemm with a constant 2-D weight becomes MatMulNBits + Add.

PASS_NAME = "nbits"
DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class NBitsConfig:
    """What `MatMulNBitsQuantizer` writes; see the module docstring for `accuracy_level`."""

    bits: int = 4  # 4 or 8 (ONNX Runtime >= 1.22 has 8-bit CPU kernels)
    block_size: int = 32  # a power of two >= 16
    accuracy_level: int = 4  # 0/1: FP32 compute; 4: int8 compute
    symmetric: bool = True  # no zero points
    nodes_to_exclude: tuple[str, ...] = ()  # node names of the source model to keep in float

    def label(self) -> str:
        return f"nbits-{self.bits}b-bs{self.block_size}-acc{self.accuracy_level}{'' if self.symmetric else '-asym'}"


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def gemms_as_matmuls(model: onnx.ModelProto, exclude: tuple[str, ...] = ()) -> int:
    """Rewrite, in place, each main-graph Gemm with a constant 2-D B (alpha 1, transA 0) as MatMul + Add, so
    ONNX Runtime's quantizer sees it. transB is folded into a transposed copy of the weight, beta into a scaled
    copy of C. The MatMul keeps the Gemm's name (so exclusions by name still hold). Returns how many."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    rewritten = 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        b = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (b is None or node.name in exclude or len(b.dims) != 2 or _attr(node, "alpha", 1.0) != 1.0
                or _attr(node, "transA", 0)):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(b)
        b_name = node.input[1]
        if _attr(node, "transB", 0):
            b_name = f"{node.input[1]}_T_{node.name or rewritten}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), b_name))
        out = node.output[0]
        has_c = len(node.input) > 2 and node.input[2] != ""
        mm_out = f"{out}_nbits_mm" if has_c else out
        nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [mm_out], name=node.name))
        if has_c:
            c_name = node.input[2]
            beta = float(_attr(node, "beta", 1.0))
            if beta != 1.0:
                if c_name not in inits:  # a computed C scaled at run time would need a Mul; keep the Gemm
                    nodes[-1] = node
                    continue
                c_name = f"{c_name}_beta_{node.name or rewritten}"
                graph.initializer.append(numpy_helper.from_array(
                    (numpy_helper.to_array(inits[node.input[2]]) * beta).astype(weight.dtype), c_name))
            nodes.append(helper.make_node("Add", [mm_out, c_name], [out], name=f"{node.name}_bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name in used or i.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return rewritten


def count(model: onnx.ModelProto) -> int:
    """MatMulNBits nodes in the main graph."""
    return sum(1 for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == DOMAIN)


def _block_quantize(weight: np.ndarray, config: NBitsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed [N, blocks, blob], scales [N, blocks], zero points) of a [K, N] weight, as MatMulNBits reads them
    (the layout and calls of ONNX Runtime's DefaultWeightOnlyQuantizer.qbits_block_quant, QOperator format)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight.shape
    kpack = 8 // config.bits
    k_blocks = -(-rows // config.block_size)
    if k_blocks * config.block_size > rows:
        weight = np.pad(weight, ((0, k_blocks * config.block_size - rows), (0, 0)))
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    packed = np.zeros((cols, k_blocks, config.block_size // kpack), dtype=np.uint8)
    zero_points = np.zeros((cols, -(-k_blocks // kpack)), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    quantize = quantize_matmul_8bits if config.bits == 8 else quantize_matmul_4bits
    quantize(packed, weight, scales, zero_points, config.block_size, cols, rows, config.symmetric)
    return packed, scales, zero_points


def _quantizable(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], exclude: tuple[str, ...]) -> bool:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.name in exclude:
        return False
    b = inits.get(node.input[1])
    return b is not None and len(b.dims) == 2 and b.data_type == onnx.TensorProto.FLOAT


def build(model: onnx.ModelProto, config: NBitsConfig, feed: dict[str, np.ndarray]) -> PassResult:
    """`model` with its constant-weight MatMuls (and Gemms, see `gemms_as_matmuls`) as MatMulNBits."""
    if config.bits not in (4, 8) or config.block_size < 16 or config.block_size & (config.block_size - 1):
        raise PassError(f"{PASS_NAME}: bits must be 4 or 8 and block_size a power of two >= 16, got "
                        f"{config.bits}, {config.block_size}")
    work = copy.deepcopy(model)
    gemms = gemms_as_matmuls(work, config.nodes_to_exclude)
    graph = work.graph
    inits = {i.name: i for i in graph.initializer}
    done: dict[str, list[str]] = {}  # weight name -> its quantized inputs (a weight shared by several MatMuls)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if not _quantizable(node, inits, config.nodes_to_exclude):
            nodes.append(node)
            continue
        b_name = node.input[1]
        weight = numpy_helper.to_array(inits[b_name])
        if b_name not in done:
            packed, scales, zero_points = _block_quantize(weight, config)
            done[b_name] = [f"{b_name}_Q{config.bits}", f"{b_name}_scales"]
            graph.initializer.extend([numpy_helper.from_array(packed, done[b_name][0]),
                                      numpy_helper.from_array(scales, done[b_name][1])])
            if not config.symmetric:
                done[b_name].append(f"{b_name}_zero_points")
                graph.initializer.append(numpy_helper.from_array(zero_points, done[b_name][2]))
        attrs = {"K": weight.shape[0], "N": weight.shape[1], "bits": config.bits, "block_size": config.block_size}
        if config.accuracy_level:  # 0 is the default and left out, as ONNX Runtime's quantizer does
            attrs["accuracy_level"] = config.accuracy_level
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *done[b_name]], list(node.output),
                                      name=f"{node.name}_Q{config.bits}" if node.name else "", domain=DOMAIN,
                                      **attrs))
    if not done:
        raise PassError(f"{PASS_NAME}: no MatMul/Gemm with a constant 2-D float weight to quantize")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == DOMAIN for o in work.opset_import):
        work.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    verify_runs(work, feed, PASS_NAME)
    n = count(work)
    changes = {"matmul_nbits": n, "gemms_as_matmul": gemms, "bits": config.bits, "block_size": config.block_size,
               "accuracy_level": config.accuracy_level, "symmetric": config.symmetric}
    compute = "int8" if config.accuracy_level == 4 else "fp32"
    zero = "symmetric" if config.symmetric else "with zero points"
    return PassResult(work, changes, [f"{n} MatMul/Gemm weights stored in {config.bits} bits, blocks of "
                                      f"{config.block_size} along K ({zero}), {compute} compute"])


# ---------------------------------------------------------------- the bench


def grid(which: str) -> list[NBitsConfig]:
    """The settings tried: "short" is 4-bit/8-bit x block 32/128 x accuracy 0/4; "full" adds blocks 16 and 64,
    accuracy_level 1 and asymmetric twins of the 4-bit block-32 settings."""
    blocks = (16, 32, 64, 128) if which == "full" else (32, 128)
    out = [NBitsConfig(bits=b, block_size=bs, accuracy_level=acc)
           for b in (4, 8) for bs in blocks for acc in (0, 4)]
    if which == "full":
        out += [NBitsConfig(bits=4, block_size=32, accuracy_level=1),
                NBitsConfig(bits=4, block_size=32, accuracy_level=0, symmetric=False),
                NBitsConfig(bits=4, block_size=32, accuracy_level=4, symmetric=False)]
    return out


def judged(model: bytes, reference: list[dict], holdout: list[dict]) -> str:
    """Worst cosine / slice cosine / top-1 against fused FP32 and the strict gate's verdict."""
    report = compare(reference, run_outputs(create_session(model, SessionSettings()), holdout), Tolerance())
    outs = list(report.outputs.values())
    cos = min((o.cosine for o in outs if o.cosine is not None), default=float("nan"))
    sl = min((o.slices.worst_cosine for o in outs if o.slices and o.slices.worst_cosine is not None),
             default=float("nan"))
    top1 = [o.top1 for o in outs if o.top1 is not None]
    verdict = "PASS" if report.passed else f"fail ({(report.reason or '')[:60]})"
    return f"cos {cos:.5f} slice {sl:.4f}{f' top1 {min(top1):.3f}' if top1 else ''}  {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per variant (all interleaved)")
    parser.add_argument("--samples", type=int, default=40, help="held-back feeds for the accuracy figures")
    parser.add_argument("--grid", choices=("short", "full"), default="short")
    parser.add_argument("--no-timing", action="store_true", help="accuracy only")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads for the timing (0: ONNX Runtime's "
                        "default; auto also times one-thread twins)")
    args = parser.parse_args()
    print(f"machine: {describe()}")
    for real in real_models.available_models():
        if real.name not in args.models:
            continue
        started = time.monotonic()
        feeds = real.sample_feeds(args.samples + 1, 0)
        feed, holdout = feeds[0], feeds[1:]
        fused = cleanup.run(onnx.load(str(real.path)), cleanup.CleanupConfig(provider="cpu"), feed=feed).model
        timed = {FUSED: fused.SerializeToString()}
        reference = run_outputs(create_session(timed[FUSED], SessionSettings()), holdout)
        notes: dict[str, str] = {}
        print(f"## {real.name}", flush=True)
        for config in grid(args.grid):
            try:
                result = build(fused, config, feed)
            except Exception as exc:  # noqa: BLE001 - a failed setting is a line, not the end
                print(f"  {config.label():28} failed: {str(exc)[:110]}", flush=True)
                continue
            timed[config.label()] = result.model.SerializeToString()
            notes[config.label()] = f"{result.changes['matmul_nbits']:3d} nodes  " + judged(
                timed[config.label()], reference, holdout)
            if args.no_timing:
                print(f"  {config.label():28} {notes[config.label()]}", flush=True)
        if not args.no_timing and len(timed) > 1:
            stats = measure(timed, feed, SessionSettings(intra_op_threads=args.threads), min_runs=20, max_runs=2000,
                            target_seconds=args.seconds * (len(timed) + 1), aa_control=True)
            base = stats[FUSED]
            print(f"  {FUSED:28} p50 {base.p50_ms:8.2f} ms  {len(base.round_ms)} rounds")
            for name, s in stats.items():
                if name == FUSED:
                    continue
                r = paired_ratio(base, s)
                print(f"  {name:28} p50 {s.p50_ms:8.2f} ms  {r.median:.2f}x fused [{r.low:.2f}-{r.high:.2f}]  "
                      f"{notes.get(name, 'same bytes as fused')}", flush=True)
        print(f"  ({time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""SmoothQuant-style activation smoothing (Xiao et al. 2022) before INT8 quantization of MatMul models.

An activation X that feeds a MatMul/Gemm/Attention with a constant weight W[K, N] often has a few outlier
channels along K; INT8 quantizes X with one scale per tensor, so the outliers leave the other channels a
handful of levels. With s_k = max|X_k|^alpha / max|W_k,:|^(1-alpha) (from calibration samples),
(X / s) @ (s * W) equals X @ W and moves part of the outliers' range into W, which is quantized per
output channel. The division is folded into X's producer where that is exact: a (Skip/Embed)
LayerNormalization's gamma and beta, a MatMul/Gemm's output columns (and the bias Add after it), or
Attention's value projection columns (attention is linear in V per channel). Where no producer can
absorb it (GELU, a residual that also reads X, a graph input), a Mul by 1/s is inserted, if asked.
FP32 outputs are unchanged up to rounding.

Measured (bench/smooth.py): on MiniLM, LayerNorm outputs only (post-LN BERT: each also feeds a residual, so
12 Muls; no measurable cost, 27.05 vs 27.29 ms) let dynamic S8 pass the strict gate with 2 FFN-output MatMuls
in float, where auto's repair needed 8 without it (1.90x vs 1.51x). Smoothing every activation (after GELU,
attention) was worse there: MiniLM's worst channel slice is dominated by weight rounding, which smoothing
adds to. PP-OCR rec: no change (its INT8 error comes from the Conv backbone).

Why not ONNX Runtime's own `SmoothQuant` extra option: it exists only in `quantize_static`, needs a
`calibration_data_reader` (our static pass hands ranges through a calibration cache, which it refuses)
and imports Intel Neural Compressor (`neural_compressor.adaptor.ox_utils.smooth_quant`), a large
dependency; dynamic quantization, the recipe transformers use, has no such option at all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from optimizer.errors import PassError, first_line
from optimizer.passes.base import PassResult, verify_runs
from optimizer.runtime import SessionSettings, create_session

PASS_NAME = "smooth"
Feed = dict[str, np.ndarray]

# Producers whose output 0 is gamma * normalized + beta: (gamma input index, beta input index).
NORMS = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3), "EmbedLayerNormalization": (5, 6)}
_S_RANGE = (1e-4, 1e4)  # bounds on s, so a dead channel cannot blow a weight row up


@dataclass(frozen=True)
class SmoothConfig:
    alpha: float = 0.5  # share of the outliers moved into the weights (0: none, 1: all)
    # "norm": only activations a (Skip/Embed)LayerNormalization writes, the paper's recipe (QKV and FFN-in
    # projections); "all": every one, also after GELU or attention (MiniLM: worse, see bench/smooth.py).
    scope: Literal["norm", "all"] = "norm"
    # Insert Mul(1/s) where no producer can absorb the division (costs one elementwise op per activation).
    insert_mul: bool = False
    max_samples: int = 32  # calibration samples read for the channel maxima


@dataclass
class _Target:
    """One consumer of X with a constant weight whose rows (one per channel of X) get multiplied by s."""

    node: onnx.NodeProto
    weight: str
    k_axis: int  # the axis of the weight along X's channels


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.outputs = {o.name for o in model.graph.output}

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def only_read_by(self, tensor: str, nodes: Sequence[onnx.NodeProto]) -> bool:
        return tensor not in self.outputs and all(any(c is n for n in nodes) for c in self.consumers[tensor])

    def set_const(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Write `value` as the node's input `index`, in a new initializer when others read the old one."""
        name = node.input[index]
        if len(self.consumers[name]) > 1 or name in self.outputs:
            name = f"{name}_smooth{len(self.inits)}"
            node.input[index] = name
            self.model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
            self.inits[name] = self.model.graph.initializer[-1]
        else:
            self.inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _target(graph: _Graph, node: onnx.NodeProto, tensor: str) -> _Target | None:
    """`node` as a smoothing target for its input `tensor`, or None when its weight is not a plain constant."""
    if len(node.input) < 2 or node.input[0] != tensor or tensor in node.input[1:]:
        return None
    weight = graph.const(node.input[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return None
    if node.op_type in ("MatMul", "Attention"):
        return _Target(node, node.input[1], 0)
    if node.op_type == "Gemm" and not _attr(node, "transA"):
        return _Target(node, node.input[1], 1 if _attr(node, "transB") else 0)
    return None


def _bias_ok(bias: np.ndarray | None, k: int) -> bool:
    return bias is None or (bias.dtype == np.float32 and bias.shape in ((k,), (1, k)))


def _fold(graph: _Graph, tensor: str, targets: list[_Target], inv: np.ndarray) -> str | None:
    """Divide `tensor` by s inside its producer (exact); the producer's op type, or None when none can."""
    producer = graph.producer.get(tensor)
    if producer is None or not graph.only_read_by(tensor, [t.node for t in targets]):
        return None
    k = inv.shape[0]
    op = producer.op_type
    if op in NORMS and producer.output[0] == tensor:
        g, b = NORMS[op]
        gamma = graph.const(producer.input[g]) if len(producer.input) > g else None
        beta = graph.const(producer.input[b]) if len(producer.input) > b and producer.input[b] else None
        if gamma is None or gamma.shape != (k,) or not _bias_ok(beta, k):
            return None
        if len(producer.input) > b and producer.input[b] and beta is None:
            return None  # beta computed at run time
        graph.set_const(producer, g, gamma * inv)
        if beta is not None:
            graph.set_const(producer, b, beta * inv)
        return op
    if op == "Add":  # MatMul(X, W) + bias: divide W's columns and the bias
        for mi, bi in ((0, 1), (1, 0)):
            matmul = graph.producer.get(producer.input[mi])
            bias = graph.const(producer.input[bi])
            if (matmul is not None and matmul.op_type == "MatMul" and bias is not None and _bias_ok(bias, k)
                    and graph.only_read_by(producer.input[mi], [producer])):
                weight = graph.const(matmul.input[1])
                if weight is not None and weight.ndim == 2 and weight.shape[1] == k:
                    graph.set_const(matmul, 1, weight * inv)
                    graph.set_const(producer, bi, bias * inv)
                    return "MatMul+Add"
        return None
    weight = graph.const(producer.input[1]) if len(producer.input) > 1 else None
    if op == "MatMul" and weight is not None and weight.ndim == 2 and weight.shape[1] == k:
        graph.set_const(producer, 1, weight * inv)
        return op
    if op == "Gemm" and weight is not None and weight.ndim == 2:
        trans_b = _attr(producer, "transB")
        bias = graph.const(producer.input[2]) if len(producer.input) > 2 and producer.input[2] else None
        if weight.shape[0 if trans_b else 1] != k or not _bias_ok(bias, k) or (
                len(producer.input) > 2 and producer.input[2] and bias is None) or _attr(producer, "alpha", 1) != 1:
            return None
        graph.set_const(producer, 1, weight * (inv[:, None] if trans_b else inv))
        if bias is not None:
            graph.set_const(producer, 2, bias * inv)
        return op
    if op == "Attention" and weight is not None and producer.output[0] == tensor:
        # Output channel c of Attention is value channel c (heads concatenated in column order).
        bias = graph.const(producer.input[2]) if len(producer.input) > 2 and producer.input[2] else None
        sizes = next((list(a.ints) for a in producer.attribute if a.name == "qkv_hidden_sizes"), None)
        if (sizes and len(set(sizes)) != 1) or weight.ndim != 2 or weight.shape[1] != 3 * k or bias is None \
                or bias.shape != (3 * k,) or _attr(producer, "unidirectional") not in (0, 1):
            return None
        scale = np.concatenate([np.ones(2 * k, np.float32), inv])
        graph.set_const(producer, 1, weight * scale)
        graph.set_const(producer, 2, bias * scale)
        return op
    return None


def candidates(model: onnx.ModelProto) -> dict[str, list[_Target]]:
    """Activations to smooth: tensor -> its consumers with constant float weights (every one of them that has one)."""
    graph = _Graph(model)
    found: dict[str, list[_Target]] = {}
    for tensor, readers in graph.consumers.items():
        if tensor in graph.inits:
            continue
        targets = [t for t in (_target(graph, n, tensor) for n in readers) if t is not None]
        rows = {graph.inits[t.weight].dims[t.k_axis] for t in targets}
        if targets and len(rows) == 1:
            found[tensor] = targets
    return found


def channel_maxima(model: onnx.ModelProto, tensors: Sequence[str], feeds: Sequence[Feed]) -> dict[str, np.ndarray]:
    """max |x| per channel (last axis) of each tensor over the feeds, run in ONNX Runtime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in known:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = create_session(probe.SerializeToString(), SessionSettings(optimization_level="basic"))
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(tensors, session.run(list(tensors), feed), strict=True):
            m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            maxima[name] = np.maximum(maxima[name], m) if name in maxima else m
    return maxima


def smoothing_scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_k = max|X_k|^alpha / max|W_k|^(1-alpha), 1 where a channel or its weights are all zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x_max, alpha) / np.power(w_max, 1.0 - alpha)
    s = np.where((x_max > 0) & (w_max > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, *_S_RANGE).astype(np.float32)


def _place(graph: onnx.GraphProto, muls: dict[str, onnx.NodeProto]) -> None:
    """Put each inserted Mul right after the node that produces its input (first, for a graph input)."""
    nodes = [m for t, m in muls.items() if not any(t in n.output for n in graph.node)]
    for node in graph.node:
        nodes.append(node)
        nodes += [muls[o] for o in node.output if o in muls]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    del graph.node[:]
    graph.node.extend(copies)


def run(model: onnx.ModelProto, config: SmoothConfig, calibration_feeds: Sequence[Feed], feed: Feed) -> PassResult:
    """Smooth every activation that feeds constant-weight MatMul/Gemm/Attention nodes; PassError if none could be."""
    if not 0.0 <= config.alpha <= 1.0:
        raise PassError(f"{PASS_NAME}: alpha must lie in [0, 1], not {config.alpha}")
    if not calibration_feeds:
        raise PassError(f"{PASS_NAME}: smoothing needs calibration samples to measure activation channels")
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    found = candidates(smoothed)
    if config.scope == "norm":
        producer = {o: n.op_type for n in smoothed.graph.node for o in n.output}
        found = {t: targets for t, targets in found.items() if producer.get(t) in NORMS}
    if not found:
        raise PassError(f"{PASS_NAME}: no MatMul/Gemm/Attention with a constant float weight reads "
                        + ("a LayerNormalization's output" if config.scope == "norm" else "an activation"))
    try:
        maxima = channel_maxima(smoothed, sorted(found), calibration_feeds[: config.max_samples])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise PassError(f"{PASS_NAME}: measuring activation channels failed: {first_line(exc)}") from None
    graph = _Graph(smoothed)
    folded: dict[str, int] = defaultdict(int)
    muls: dict[str, onnx.NodeProto] = {}  # tensor -> Mul(tensor, 1/s), placed in the graph at the end
    skipped = []
    for tensor, targets in sorted(found.items()):
        w_max = np.max([np.abs(graph.const(t.node.input[1])).max(axis=1 - t.k_axis) for t in targets], axis=0)
        x_max = maxima[tensor].astype(np.float32)
        if x_max.shape != w_max.shape:
            skipped.append(tensor)
            continue
        s = smoothing_scales(x_max, w_max, config.alpha)
        inv = (1.0 / s).astype(np.float32)
        how = _fold(graph, tensor, targets, inv)
        if how is None and config.insert_mul:
            scale_name = f"{tensor}_inv_smooth_scale"
            smoothed.graph.initializer.append(numpy_helper.from_array(inv, scale_name))
            muls[tensor] = helper.make_node("Mul", [tensor, scale_name], [f"{tensor}_smoothed"],
                                            name=f"{tensor}_SmoothMul")
            for t in targets:
                t.node.input[0] = f"{tensor}_smoothed"
            how = "inserted Mul"
        if how is None:
            skipped.append(tensor)
            continue
        folded[how] += 1
        for t in targets:
            weight = graph.const(t.node.input[1])
            graph.set_const(t.node, 1, weight * (s[:, None] if t.k_axis == 0 else s))
    if muls:
        _place(smoothed.graph, muls)
    if not folded:
        raise PassError(f"{PASS_NAME}: no producer can absorb the smoothing of {len(found)} activations "
                        "(and inserting a Mul was not asked for)")
    verify_runs(smoothed, feed, PASS_NAME)
    changes = {"alpha": config.alpha, "smoothed": dict(folded), "not_smoothed": len(skipped),
               "calibration_samples": min(len(calibration_feeds), config.max_samples)}
    notes = [f"{len(skipped)} activations left as they were: no producer can absorb 1/s exactly"] if skipped else []
    return PassResult(smoothed, changes, notes)


class Smoothed:
    """The smoothed source per (source, config) for one auto search. Every repair build of a "-sq" candidate and
    its sensitivity ranking need the same smoothed model: measured once, and the same object reaches
    int8_dynamic.Preprocessed, which pre-processes each model object once. A search hands every build of a source
    the same object, and each stays referenced here, so an id is never reused meanwhile."""

    def __init__(self) -> None:
        self._results: dict[tuple[int, SmoothConfig], tuple[onnx.ModelProto, PassResult]] = {}

    def get(self, model: onnx.ModelProto, config: SmoothConfig, calibration_feeds: Sequence[Feed],
            feed: Feed) -> PassResult:
        entry = self._results.get((id(model), config))
        if entry is None or entry[0] is not model:
            entry = self._results[(id(model), config)] = (model, run(model, config, calibration_feeds, feed))
        return entry[1]

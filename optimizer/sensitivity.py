"""Which nodes of a QDQ model lose the most to quantization: the ranking a mixed-precision repair follows.

ONNX Runtime's `qdq_loss_debug` does the heavy lifting: it augments the QDQ model so every float
tensor becomes an output, runs it, and pairs each activation before its QuantizeLinear with the
same activation after its DequantizeLinear. We score each pair ourselves because its default score
(one SQNR over the whole tensor) misses the failure that matters most: a tensor whose channels live
on different scales (a detector's boxes 0-320 next to scores 0-1) gets one quantization step, the
small channels round away, and the whole-tensor SQNR still looks fine. Our score is the mean over
channels of each channel's relative error ||pre - post|| / ||pre||, so it rises when most channels
are ruined (pre clipped to the quantized range first: see `rank`). The augmented model saves
flattened tensors; channel shapes come from shape inference.

A tensor is quantized because a quantized node produces or consumes it, so a tensor's "unit" is its
producer and its consumers: the nodes to leave in float so that tensor stays float.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.calibrate import CalibrationDataReader
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    create_activation_matching,
    modify_model_output_intermediate_tensors,
)
from onnxruntime.quantization.quant_utils import QUANT_INPUT_SUFFIX

from optimizer.accuracy import default_channel_axis

Feed = dict[str, np.ndarray]
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: Activation bytes the ranking may hold at once (every float tensor of every sample it runs).
DEFAULT_MEMORY_BUDGET = 512 * 1024**2


@dataclass
class TensorLoss:
    """One quantized activation, how much quantizing it alone loses, and the nodes that keep it float."""

    tensor: str
    error: float  # mean over channels of ||pre - post|| / ||pre||; 0 = lossless
    nodes: list[str]  # its producer and consumers (names in the QDQ model)

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "error": round(self.error, 5), "nodes": self.nodes}


class _Reader(CalibrationDataReader):
    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._feeds, None)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every tensor's inferred dims (None where unknown); tensors without a shape are left out."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return shapes


def _channel_error(pre: np.ndarray, post: np.ndarray, dims: list[int | None] | None) -> float:
    """Mean relative error per channel; the whole tensor is one channel when its layout is unknown."""
    pre, post = pre.astype(np.float64).ravel(), post.astype(np.float64).ravel()
    channels, inner = 1, 1
    if dims is not None and len(dims) >= 2:
        axis = default_channel_axis([d or 0 for d in dims]) if len(dims) >= 3 else 1
        trailing = dims[axis + 1:] if axis is not None else [None]
        if axis is not None and dims[axis] and all(trailing) and pre.size % (dims[axis] * int(np.prod(trailing))) == 0:
            channels, inner = int(dims[axis]), int(np.prod(trailing))
    pre3 = pre.reshape(-1, channels, inner).transpose(1, 0, 2).reshape(channels, -1)
    post3 = post.reshape(-1, channels, inner).transpose(1, 0, 2).reshape(channels, -1)
    norms = np.linalg.norm(pre3, axis=1)
    errors = np.linalg.norm(pre3 - post3, axis=1)
    live = norms > 1e-12 * max(float(norms.max(initial=0.0)), 1e-30)
    if not live.any():
        return 0.0
    return float(np.mean(errors[live] / norms[live]))


def tensor_units(model: onnx.ModelProto, tensor: str) -> list[str]:
    """The non-Q/DQ nodes that produce `tensor` or consume it (through its Q/DQ pair), by name."""
    producers = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names: list[str] = []
    for source in (tensor, tensor + QUANT_INPUT_SUFFIX):
        node = producers.get(source)
        if node is not None and node.op_type not in _QDQ_OPS and node.name not in names:
            names.append(node.name)
    frontier, seen = [tensor, tensor + QUANT_INPUT_SUFFIX], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        for node in consumers.get(current, []):
            if node.op_type in _QDQ_OPS:
                frontier.extend(node.output)
            elif node.name not in names:
                names.append(node.name)
    return names


def rank(qdq_model: onnx.ModelProto, feeds: Sequence[Feed], *, max_samples: int = 8,
         memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> list[TensorLoss]:
    """Quantized activations of a QDQ model, worst first, scored on (calibration) `feeds`.

    Runs at most `max_samples` feeds and fewer when every float tensor of one run would not fit
    `memory_budget_bytes` (the augmented model returns them all at once).
    """
    from optimizer.passes.int8_static import activation_bytes_per_sample

    per_sample, _ = activation_bytes_per_sample(qdq_model, feeds[0])
    # each tensor is saved twice around its Q/DQ pair, and the runs are held together
    count = max(1, min(max_samples, len(feeds), memory_budget_bytes // max(2 * per_sample, 1)))
    shapes = _shapes(qdq_model)
    with tempfile.TemporaryDirectory(prefix="onnxforge-sens-") as tmp:
        source, augmented = Path(tmp) / "qdq.onnx", Path(tmp) / "augmented.onnx"
        onnx.save_model(qdq_model, source)
        modify_model_output_intermediate_tensors(source, augmented)
        activations = collect_activations(str(augmented), _Reader(feeds[:count]))
    matching = create_activation_matching(activations)
    losses = []
    for tensor, pair in matching.items():
        dims = shapes.get(tensor) or shapes.get(tensor + QUANT_INPUT_SUFFIX)
        pre = np.concatenate([np.ravel(a) for a in pair["pre_qdq"]])
        post = np.concatenate([np.ravel(a) for a in pair["post_qdq"]])
        if pre.shape != post.shape or not pre.size:
            continue
        # The quantizer folds a Relu after Conv into its QuantizeLinear (range [0, max]), so "pre" can be
        # the Conv output before the Relu: clip it to the quantized range, or the Relu itself counts as loss.
        # With MinMax ranges from these same feeds the clip removes nothing else.
        pre = np.clip(pre, post.min(), post.max())
        losses.append(TensorLoss(tensor, _channel_error(pre, post, dims), tensor_units(qdq_model, tensor)))
    losses.sort(key=lambda t: t.error, reverse=True)
    return losses


HEAVY_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Attention")


def head_nodes(model: onnx.ModelProto, heavy_ops: Sequence[str] = HEAVY_OPS, limit: int = 16) -> list[str]:
    """The output head: nodes between the graph outputs and the last heavy node on each path, inclusive.

    Leaving them in float is the cheapest repair: it costs no measurable speed on real models
    (pitfalls.md) and keeps outputs whose channels live on different scales out of one INT8 scale.
    """
    producers = {out: n for n in model.graph.node for out in n.output}
    weights = {t.name for t in model.graph.initializer}
    names: list[str] = []
    frontier = [o.name for o in model.graph.output]
    seen: set[str] = set()
    while frontier and len(names) < limit:
        tensor = frontier.pop(0)
        node = producers.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        names.append(node.name)
        if node.op_type in heavy_ops:
            continue
        activations = [i for i in node.input if i and i not in weights]
        # Follow chains (Sigmoid, Reshape, ...) and the final Concat of a detector; stop at other merges
        # (a residual Add leads back through the whole network).
        if len(activations) == 1 or node.op_type == "Concat":
            frontier.extend(activations)
    return names

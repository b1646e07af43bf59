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

A dynamic INT8 model has no Q/DQ pairs to read (activations are quantized inside
DynamicQuantizeLinear/MatMulInteger at run time), so `rank_dynamic` isolates each quantized node
instead: ONNX Runtime's dynamic quantizer keeps a quantized node's output tensor name, so the
quantized model's nodes that compute it from tensors both models share (DynamicQuantizeLinear ->
MatMulInteger -> Cast -> Mul for a MatMul) become a small model of their own, fed the float model's
values of what it reads, and compared with the float model's output, per channel as above. That is
the error the node adds by itself, as qdq_loss_debug's pre/post pair is for a static tensor. Scoring
the full quantized model's tensors instead (a node's output error minus its inputs') failed on a
built MLP: once one node breaks, every later tensor carries its error and the second broken node
hid behind it. The cost: one run of the float model per feed, plus one run of each local model
(MiniLM: 25 of them, a few seconds in all), against a quantize_dynamic build per node (5-10 s each
on a real transformer) for quantizing one node at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
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
from onnxruntime.quantization.registry import IntegerOpsRegistry

from optimizer.accuracy import default_channel_axis
from optimizer.runtime import create_session

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


#: Op types ONNX Runtime's dynamic quantizer rewrites (Gemm through MatMul + Add).
DYNAMIC_OPS = frozenset({*IntegerOpsRegistry, "Gemm"})
_QUANTIZED_MARKERS = ("DynamicQuantize", "Integer", "QAttention", "QGemm", "QEmbed", "QLinear")


def _quantized_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if any(m in n.op_type for m in _QUANTIZED_MARKERS)]


def _was_quantized(name: str, quantized_names: list[str]) -> bool:
    """True when the quantizer wrote an integer op for the float node `name`: it names it after the node
    ("<node>_quant"), after quant_pre_process's fusion of it ("<node>/MatMulAddFusion_MatMul_quant") or after
    its own Gemm rewrite ("<gemm>_MatMul_quant")."""
    return any(q.startswith((name + "_", name + "/")) for q in quantized_names)


def _observed_output(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]],
                     present: set[str]) -> str | None:
    """The node's output, or the first tensor down its chain of single consumers that the quantized model
    still has (quant_pre_process fuses MatMul + Add into one Gemm that writes the Add's output)."""
    tensor = node.output[0]
    for _ in range(3):
        if tensor in present:
            return tensor
        after = consumers.get(tensor, [])
        if len(after) != 1:
            return None
        tensor = after[0].output[0]
    return tensor if tensor in present else None


class _ChannelSums:
    """Per channel, the squared norms of the reference and of the difference, summed over feeds: the mean
    relative error per channel of `_channel_error` over all feeds, one feed's tensors held at a time."""

    def __init__(self) -> None:
        self.ref: np.ndarray | None = None
        self.diff: np.ndarray | None = None

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if not np.issubdtype(a.dtype, np.floating) or a.shape != b.shape or not a.size:
            return
        axis = (default_channel_axis(a.shape) if a.ndim >= 3 else 1) if a.ndim >= 2 else None
        if axis is None:
            a2, b2 = a.reshape(1, -1), b.reshape(1, -1)
        else:
            a2 = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
            b2 = np.moveaxis(b, axis, 0).reshape(a.shape[axis], -1)
        a2, b2 = a2.astype(np.float64), b2.astype(np.float64)
        ref, diff = (a2 * a2).sum(axis=1), ((a2 - b2) ** 2).sum(axis=1)
        if self.ref is not None and self.ref.shape != ref.shape:  # channels differ between feeds: whole tensor
            ref, diff = np.array([ref.sum() + self.ref.sum()]), np.array([diff.sum() + self.diff.sum()])
            self.ref = self.diff = None
        self.ref = ref if self.ref is None else self.ref + ref
        self.diff = diff if self.diff is None else self.diff + diff

    def error(self) -> float:
        if self.ref is None or self.diff is None:
            return 0.0
        live = self.ref > 1e-24 * max(float(self.ref.max(initial=0.0)), 1e-60)
        return float(np.mean(np.sqrt(self.diff[live] / self.ref[live]))) if live.any() else 0.0


def _with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> bytes:
    """`model` with `tensors` as extra graph outputs (ONNX Runtime infers their types); unflattened, so each
    keeps its shape for the per-channel error."""
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    listed = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in listed)
    return augmented.SerializeToString()


def _local_nodes(producers: dict[str, onnx.NodeProto], tensor: str,
                 boundary: set[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """The nodes that compute `tensor` from `boundary` tensors, and the boundary tensors (or graph inputs)
    they read: for a dynamically quantized MatMul, DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul."""
    nodes: dict[str, onnx.NodeProto] = {}
    inputs: list[str] = []
    frontier, seen = [tensor], set()
    while frontier:
        current = frontier.pop()
        if current in seen or not current:
            continue
        seen.add(current)
        node = producers.get(current)
        if node is None or (current in boundary and current != tensor):
            inputs.append(current)
            continue
        nodes[node.output[0]] = node
        frontier.extend(node.input)
    return list(nodes.values()), inputs


@dataclass
class _Local:
    """One quantized node as a model of its own, fed the float model's values of what it reads."""

    name: str  # the node in the float model
    observed: str  # its output (or the first tensor after it that both models have)
    nodes: list[onnx.NodeProto]
    inputs: list[str]  # tensors both models have (or graph inputs), read by `nodes`
    session: object | None = None
    sums: _ChannelSums | None = None

    def model(self, quantized: onnx.ModelProto, order: dict[str, int], values: dict[str, np.ndarray]) -> bytes:
        """`order`: the quantized model's node positions by first output, its topological order."""
        nodes = sorted(self.nodes, key=lambda n: order[n.output[0]])
        used = {i for n in nodes for i in n.input}
        graph = onnx.helper.make_graph(
            nodes, f"local-{self.name}",
            [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(values[i].dtype), None)
             for i in self.inputs],
            [onnx.ValueInfoProto(name=self.observed)],
            [t for t in quantized.graph.initializer if t.name in used])
        local = onnx.helper.make_model(graph, opset_imports=quantized.opset_import)
        local.ir_version = quantized.ir_version
        return local.SerializeToString()


def rank_dynamic(float_model: onnx.ModelProto, quantized_model: onnx.ModelProto, feeds: Sequence[Feed], *,
                 max_samples: int = 8) -> list[TensorLoss]:
    """Nodes of `float_model` that dynamic quantization rewrote, worst first, by the error each adds when fed
    the float model's own values (see the module docstring), scored on (calibration) `feeds`."""
    producers = {out: n for n in quantized_model.graph.node for out in n.output}
    weights = {t.name for t in quantized_model.graph.initializer}
    present = (set(producers) | {i.name for i in quantized_model.graph.input}) - weights
    both = present & ({out for n in float_model.graph.node for out in n.output} |
                      {i.name for i in float_model.graph.input})
    quantized_names = _quantized_names(quantized_model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in float_model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    locals_: list[_Local] = []
    for node in float_model.graph.node:
        if node.op_type not in DYNAMIC_OPS or not node.output or not _was_quantized(node.name, quantized_names):
            continue  # not rewritten: left in float (excluded, or an op the quantizer skipped)
        observed = _observed_output(node, consumers, both)
        if observed is not None:
            nodes, inputs = _local_nodes(producers, observed, both)
            locals_.append(_Local(node.name, observed, nodes, [i for i in inputs if i not in weights]))
    if not locals_:
        return []
    feed_names = set(feeds[0]) if feeds else set()
    wanted = sorted({t for loc in locals_ for t in (loc.observed, *loc.inputs)} - feed_names)
    float_session = create_session(_with_outputs(float_model, wanted))
    order = {n.output[0]: i for i, n in enumerate(quantized_model.graph.node) if n.output}
    for feed in feeds[:max_samples]:
        values = {**dict(zip(wanted, float_session.run(wanted, feed), strict=True)), **feed}
        for loc in locals_:
            if loc.session is None:  # built on the first feed: the inputs' types come from the float values
                loc.session, loc.sums = create_session(loc.model(quantized_model, order, values)), _ChannelSums()
            [out] = loc.session.run([loc.observed], {i: values[i] for i in loc.inputs})
            loc.sums.add(np.asarray(values[loc.observed]), np.asarray(out))
    losses = [TensorLoss(loc.observed, loc.sums.error() if loc.sums else 0.0, [loc.name]) for loc in locals_]
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


#: Ops that only move values: an output Concat reaches its graph output through these.
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
#: Activations whose outputs span orders of magnitude inside a small range (a detector's scores: 3e-7 to 0.15 on
#: NudeNet's drawn scenes): INT8's uniform steps round the small ones away even at the branch's own scale, while
#: their inputs (logits) are linear and quantize well. So a small-range branch is left in float from here on.
SQUASHING_OPS = frozenset({"Sigmoid", "Softmax", "HardSigmoid", "Tanh"})
#: A Concat input whose span is under 1/16 of the Concat's gets fewer than 16 of INT8's 256 levels.
MIXED_RANGE_RATIO = 16.0
#: Cheap nodes followed back from a Concat input or forward to an output before giving up.
_MAX_CHAIN = 8


@dataclass
class MixedConcat:
    """An output Concat whose inputs live on very different ranges, and the nodes that keep each branch's scale."""

    concat: str
    ranges: dict[str, tuple[float, float]]  # each activation input's (min, max) in the float model
    small: list[str]  # the inputs spanning under 1/ratio of the Concat's range
    nodes: list[str]  # the Concat, the layout ops after it, the small branches' cheap tails

    def to_dict(self) -> dict:
        return {"concat": self.concat, "small_inputs": self.small, "nodes": self.nodes,
                "ranges": {t: [round(lo, 6), round(hi, 6)] for t, (lo, hi) in self.ranges.items()}}


def _branch_tail(producers: dict[str, onnx.NodeProto], tensor: str,
                 activations: Callable[[onnx.NodeProto], list[str]]) -> list[str]:
    """The cheap nodes just before a Concat input: layout ops back to, and including, a squashing activation."""
    names: list[str] = []
    node = producers.get(tensor)
    while node is not None and len(names) < _MAX_CHAIN:
        inputs = activations(node)
        if node.op_type not in LAYOUT_OPS | SQUASHING_OPS or len(inputs) != 1:
            break
        names.append(node.name)
        if node.op_type in SQUASHING_OPS:
            break
        node = producers.get(inputs[0])
    return names


def mixed_range_concats(model: onnx.ModelProto, feeds: Sequence[Feed], outputs: Sequence[str] | None = None, *,
                        ratio: float = MIXED_RANGE_RATIO, max_samples: int = 8) -> list[MixedConcat]:
    """Concats that make graph `outputs` (through layout ops only) from inputs whose float ranges differ by more
    than `ratio`, read from the float model's activations on (calibration) `feeds`.

    Static INT8 gives a Concat's output one scale: boxes (0-320) next to scores (0-1) round every score to 0,
    and no sensitivity ranking finds it, because every other node's error hides behind it (NudeNet: each
    leave-one-out kept slice cosine 0.000). Leaving the Concat in float lets each branch keep its own scale.
    """
    producers = {out: n for n in model.graph.node for out in n.output}
    weights = {t.name for t in model.graph.initializer}

    def activations(node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and i not in weights
                and getattr(producers.get(i), "op_type", None) != "Constant"]

    found: dict[str, tuple[onnx.NodeProto, list[str]]] = {}  # concat name -> (node, layout ops up to the output)
    for output in model.graph.output:
        if outputs is not None and output.name not in outputs:
            continue
        after: list[str] = []
        node = producers.get(output.name)
        while node is not None and node.op_type in LAYOUT_OPS and len(activations(node)) == 1 \
                and len(after) < _MAX_CHAIN:
            after.append(node.name)
            node = producers.get(activations(node)[0])
        if node is not None and node.op_type == "Concat" and len(activations(node)) >= 2:
            found.setdefault(node.name, (node, []))[1].extend(n for n in after if n not in found[node.name][1])
    if not found or not feeds:
        return []
    wanted = sorted({t for node, _ in found.values() for t in activations(node)} - set(feeds[0]))
    session = create_session(_with_outputs(model, wanted))
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for feed in feeds[:max_samples]:
        values = {**dict(zip(wanted, session.run(wanted, feed), strict=True)), **feed}
        for name, value in values.items():
            array = np.asarray(value)
            if name in wanted and np.issubdtype(array.dtype, np.floating) and array.size:
                finite = array[np.isfinite(array)]
                if finite.size:
                    lo[name] = min(lo.get(name, np.inf), float(finite.min()))
                    hi[name] = max(hi.get(name, -np.inf), float(finite.max()))
    result = []
    for node, after in found.values():
        inputs = activations(node)
        if not all(t in lo for t in inputs):
            continue  # a non-float or unmeasured input: not a range problem
        span = max(hi[t] for t in inputs) - min(lo[t] for t in inputs)
        small = [t for t in inputs if (hi[t] - lo[t]) * ratio < span]
        if not small:
            continue
        nodes = [node.name, *after]
        for tensor in small:
            nodes += [n for n in _branch_tail(producers, tensor, activations) if n not in nodes]
        result.append(MixedConcat(node.name, {t: (lo[t], hi[t]) for t in inputs}, small, nodes))
    return result

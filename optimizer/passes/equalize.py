"""Activation equalization: rescale Conv input channels so per-tensor INT8 activation ranges fit every channel.

Static INT8 quantizes each activation tensor with one scale. When one channel of a Conv's input spans
far more than the others (real CNNs: a PicoDet tensor's peak channel ~2e6x its median), the others round
to a few levels. Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization") and SmoothQuant
(Xiao et al. 2022) move that spread into the weights, which are quantized per output channel: divide
channel i of the tensor by s_i where it is produced and multiply the consuming Convs' input-channel i
weights by s_i. The FP32 function is unchanged.

A tensor qualifies when every consumer is a Conv reading it as its data input (weights are
initializers) and the chain that produces it commutes with a positive per-channel scale, ending where
the scale can be absorbed without a new op:
- Conv: output channel i's weights and bias divided by s_i;
- Mul or Div by a constant (the `/6` of a decomposed HardSwish, a learnable affine block's scale):
  the constant becomes per-channel;
- Add/Sub of a constant (an affine block's bias): the constant is divided by s_i and the chain goes on;
- Relu, LeakyRelu, PRelu, Identity (positive-homogeneous): the chain goes on.
Sigmoid, HardSigmoid, HardSwish, Clip(0, 6) and SiLU's x*sigmoid(x) are not homogeneous: the chain
stops there and the tensor is left alone (scaling through them would need an extra Mul per tensor).
Every intermediate tensor of a chain must have that one consumer, so nothing else sees the scale.

s_i = amax_i^alpha / wmax_i^(1-alpha) (SmoothQuant's rule) with amax_i the channel's largest magnitude over
the calibration samples and wmax_i the largest weight reading it. ONNX Runtime's quantization tools have
SmoothQuant only for MatMul and through neural-compressor (int8_static refuses that option), hence this pass.

Conv outputs: in QDQ, a Conv's output is quantized too (per tensor), and on PP-LCNet/PicoDet it feeds a
HardSwish that no scale passes through. With `output_spread`, Conv outputs whose channel ranges spread
get s_i = amax_i / max(amax) folded into the Conv and a Div after it restoring the original values (in
float: the QDQ heavy scope leaves Div alone). Measured on real CNNs (bench/equalize.py, QDQ U8S8 heavy):
inputs and outputs together lift PP-OCR det's worst cosine 0.919 -> 0.992 and PicoDet's 0.45 -> 0.97;
either alone far less. The Divs and per-channel constants cost part of INT8's speed gain.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from optimizer.errors import PassError
from optimizer.passes.base import PassResult, verify_runs
from optimizer.runtime import SessionSettings, create_session

PASS_NAME = "equalize"
HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity")
MAX_RELATIVE_CHANGE = 1e-4  # FP32 outputs may move by this much of their largest magnitude (rounding only)

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class EqualizeConfig:
    alpha: float = 0.5  # 0: scales from weights only; 1: every channel's activation range made equal
    min_spread: float = 4.0  # leave tensors whose largest channel range is within this factor of the median
    # Conv outputs whose largest channel range is this many times the median get their own scales, undone
    # by an inserted Div (one elementwise op each, in float); None: never.
    output_spread: float | None = None


@dataclass(frozen=True)
class _Edit:
    """One place that absorbs 1/s: `kind` conv_out | mul | div | add, on node `node`'s input `index`."""

    kind: str
    node: int  # position in graph.node (the same in a copy of the model)
    index: int


@dataclass
class Site:
    """A tensor to equalize, the Convs that read it (positions in graph.node) and where its chain absorbs 1/s."""

    tensor: str
    channels: int
    consumers: list[int]
    edits: list[_Edit]


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for name in node.input:
                self.consumers[name].append(i)
        self.outputs = {o.name for o in graph.output}

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _per_channel_ok(const: np.ndarray, channels: int, rank: int) -> bool:
    """A constant that is one value, or one value per channel laid out on axis 1 of a rank-`rank` tensor."""
    if const.size == 1:
        return const.ndim <= rank
    shape = (1, channels, *([1] * (rank - 2)))
    return const.size == channels and const.shape in (shape, shape[1:])


def _chain(graph: _Graph, tensor: str, channels: int, rank: int) -> list[_Edit] | None:
    """The edits that divide `tensor`'s channel i by s_i at its source, or None when its chain cannot."""
    position = graph.producer.get(tensor)
    if position is None:
        return None
    node = graph.nodes[position]
    if len(node.output) != 1:
        return None
    if node.op_type == "Conv":
        weight = graph.array(node.input[1])
        if weight is None or weight.shape[0] != channels or (len(node.input) > 2 and node.input[2] and
                                                             graph.array(node.input[2]) is None):
            return None
        return [_Edit("conv_out", position, 1)]
    const_index = next((i for i, name in enumerate(node.input) if name in graph.inits), None)
    data = [name for name in node.input if name not in graph.inits]

    def upstream(name: str) -> list[_Edit] | None:
        if len(graph.consumers[name]) != 1 or name in graph.outputs:
            return None
        return _chain(graph, name, channels, rank)

    if node.op_type in HOMOGENEOUS:
        if node.op_type == "PRelu" and (const_index != 1 or not _per_channel_ok(graph.array(node.input[1]),
                                                                                channels, rank)):
            return None
        return upstream(node.input[0])
    if node.op_type not in ("Mul", "Div", "Add", "Sub") or const_index is None or len(data) != 1:
        return None
    if not _per_channel_ok(graph.array(node.input[const_index]), channels, rank):
        return None
    if node.op_type == "Mul":
        return [_Edit("mul", position, const_index)]
    if node.op_type == "Div":
        return [_Edit("div", position, 1)] if const_index == 1 else None
    if node.op_type == "Sub" and const_index == 0:
        return None  # c - x: x would scale with the opposite sign of the constant
    rest = upstream(data[0])  # (x + c)/s = x/s + c/s: the constant and x both scale
    return None if rest is None else [_Edit("add", position, const_index), *rest]


def find_sites(model: onnx.ModelProto) -> list[Site]:
    """Every tensor this pass could equalize (see the module docstring)."""
    graph = _Graph(model)
    sites = []
    for tensor, positions in graph.consumers.items():
        readers = [graph.nodes[i] for i in positions]
        if tensor in graph.inits or tensor in graph.outputs or not readers:
            continue
        if not all(n.op_type == "Conv" and n.input[0] == tensor and n.input[1] in graph.inits
                   and n.input[1] != tensor for n in readers):
            continue
        weights = [graph.array(n.input[1]) for n in readers]
        channels = {w.shape[1] * _attr(n, "group", 1) for w, n in zip(weights, readers, strict=True)}
        if len(channels) != 1:
            continue
        (count,) = channels
        edits = _chain(graph, tensor, count, weights[0].ndim)
        if edits:
            sites.append(Site(tensor, count, positions, edits))
    return sites


def channel_ranges(model: onnx.ModelProto, tensors: Sequence[str], feeds: Sequence[Feed]) -> dict[str, np.ndarray]:
    """Largest magnitude of each channel (axis 1) of `tensors` over `feeds`, one run per feed."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in present)
    session = create_session(probe.SerializeToString(), SessionSettings(optimization_level="basic"))
    ranges: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = session.run(list(tensors), feed)
        for name, value in zip(tensors, values, strict=True):
            axes = tuple(a for a in range(value.ndim) if a != 1)
            amax = np.abs(value).max(axis=axes) if value.size else np.zeros(value.shape[1])
            ranges[name] = np.maximum(ranges[name], amax) if name in ranges else amax
    return ranges


def smooth_scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's s = amax^alpha / wmax^(1-alpha), with dead channels given harmless values.

    A channel that is always zero gets the smallest scale (it must not inflate its weights' range);
    one whose weights are all zero the largest. The result is normalised to a geometric mean of 1.
    """
    amax, wmax = amax.astype(np.float64), wmax.astype(np.float64)
    live = (amax > 0) & (wmax > 0)
    if not live.any():
        return np.ones_like(amax, dtype=np.float32)
    s = np.ones_like(amax)
    s[live] = amax[live] ** alpha / wmax[live] ** (1 - alpha)
    s[live] /= np.exp(np.log(s[live]).mean())
    s[amax <= 0] = s[live].min()
    s[(amax > 0) & (wmax <= 0)] = s[live].max()
    return s.astype(np.float32)


def _input_channel_scale(weight: np.ndarray, group: int, s: np.ndarray) -> np.ndarray:
    """Multiply the weights reading input channel i by s_i (grouped and depthwise Convs included)."""
    out_channels, per_group = weight.shape[0], weight.shape[1]
    shaped = weight.reshape(group, out_channels // group, per_group, *weight.shape[2:])
    factor = s.reshape(group, 1, per_group, *([1] * (weight.ndim - 2)))
    return (shaped * factor).reshape(weight.shape).astype(weight.dtype)


def apply(model: onnx.ModelProto, sites: Sequence[Site], scales: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` with each site's tensor divided by its scales and its readers compensating."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = _Graph(result)
    arrays: dict[str, np.ndarray] = {}

    def current(node: onnx.NodeProto, slot: int) -> np.ndarray:
        name = node.input[slot]
        return arrays[name] if name in arrays else graph.array(name)

    def replace(node: onnx.NodeProto, slot: int, value: np.ndarray) -> None:
        """Give `node` its own copy of an initializer: constants such as HardSwish's 6 are shared."""
        name = f"{node.input[slot]}_eq{len(arrays)}"
        arrays[name] = value
        node.input[slot] = name

    for site in sites:
        s = scales[site.tensor]
        rank = graph.array(graph.nodes[site.consumers[0]].input[1]).ndim
        for position in site.consumers:
            reader = graph.nodes[position]
            replace(reader, 1, _input_channel_scale(current(reader, 1), _attr(reader, "group", 1), s))
        for edit in site.edits:
            node = graph.nodes[edit.node]
            if edit.kind == "conv_out":
                weight = current(node, 1)
                replace(node, 1, (weight / s.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype))
                if len(node.input) > 2 and node.input[2]:
                    bias = current(node, 2)
                    replace(node, 2, (bias / s).astype(bias.dtype))
                continue
            const = current(node, edit.index)
            per_channel = s.reshape(1, -1, *([1] * (rank - 2)))
            if const.size > 1 and const.ndim == rank - 1:
                per_channel = per_channel[0]
            factor = per_channel if edit.kind == "div" else 1 / per_channel
            replace(node, edit.index, (const * factor).astype(const.dtype))
    used = {name for n in result.graph.node for name in n.input}  # a weight edited twice leaves a stale copy
    kept = [i for i in result.graph.initializer if i.name in used]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept)
    result.graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in arrays.items() if name in used)
    return result


def equalize_outputs(model: onnx.ModelProto, convs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Divide each named Conv's output channel i by s_i (weights, bias) and insert Div(1/s) after it.

    For Conv outputs nothing downstream can absorb a scale (HardSwish, SiLU): the Conv's quantized
    output gets equal channel ranges, the float ops after the Div see the original values. A Div, not
    a Mul: quant_pre_process (and ONNX Runtime at load) folds a Conv's constant Mul back into its weights
    (ConvMulFusion), which would undo the scaling before calibration; the same holds for absorbing the
    scale into a constant Mul that follows the Conv (PP-LCNet's affine blocks).
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = _Graph(result)
    nodes: list[onnx.NodeProto] = []
    extra: list[onnx.TensorProto] = []
    for node in result.graph.node:
        nodes.append(node)
        if node.op_type != "Conv" or node.name not in convs:
            continue
        s = convs[node.name]
        weight = graph.array(node.input[1])
        name = f"{node.input[1]}_eqo"
        extra.append(numpy_helper.from_array((weight / s.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype),
                                             name))
        node.input[1] = name
        if len(node.input) > 2 and node.input[2]:
            bias = graph.array(node.input[2])
            extra.append(numpy_helper.from_array((bias / s).astype(bias.dtype), f"{node.input[2]}_eqo"))
            node.input[2] = f"{node.input[2]}_eqo"
        output = node.output[0]
        node.output[0] = f"{output}_eqo"
        # (not named *_scale: quantize_static names the Conv output's scale f"{tensor}_scale" and would clash)
        divisor = f"{output}_eqo_divisor"
        extra.append(numpy_helper.from_array(1 / s.reshape(1, -1, *([1] * (weight.ndim - 2))), divisor))
        nodes.append(onnx.helper.make_node("Div", [node.output[0], divisor], [output], name=f"{node.name}_eqo_div"))
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    used = {name for n in result.graph.node for name in n.input}
    kept = [i for i in result.graph.initializer if i.name in used]
    del result.graph.initializer[:]
    result.graph.initializer.extend([*kept, *extra])
    return result


def _max_relative_change(before: onnx.ModelProto, after: onnx.ModelProto, feed: Feed) -> float:
    settings = SessionSettings(optimization_level="basic")
    ref = create_session(before.SerializeToString(), settings).run(None, feed)
    new = create_session(after.SerializeToString(), settings).run(None, feed)
    worst = 0.0
    for a, b in zip(ref, new, strict=True):
        if np.issubdtype(a.dtype, np.floating) and a.size:
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)))
    return worst


def run(model: onnx.ModelProto, config: EqualizeConfig, calibration_feeds: Sequence[Feed], feed: Feed) -> PassResult:
    """Equalize every qualifying Conv input whose channel ranges spread more than `config.min_spread`."""
    if not calibration_feeds:
        raise PassError(f"{PASS_NAME}: needs calibration samples to measure channel ranges")
    sites = find_sites(model)
    graph = _Graph(model)
    absorbing = {graph.nodes[e.node].name for site in sites for e in site.edits if e.kind == "conv_out"}
    outputs = {} if config.output_spread is None else {
        n.output[0]: n.name for n in graph.nodes
        if n.op_type == "Conv" and n.name and n.name not in absorbing and n.output[0] not in graph.outputs
        and n.input[1] in graph.inits and (len(n.input) < 3 or not n.input[2] or n.input[2] in graph.inits)}
    tensors = [s.tensor for s in sites] + list(outputs)
    ranges = channel_ranges(model, tensors, calibration_feeds) if tensors else {}
    chosen, scales, spreads = [], {}, []
    for site in sites:
        amax = ranges[site.tensor]
        spread = float(amax.max() / max(np.median(amax), 1e-12))
        if spread < config.min_spread:
            continue
        wmax = np.zeros(site.channels, dtype=np.float32)
        for position in site.consumers:
            reader = graph.nodes[position]
            weight = graph.array(reader.input[1])
            group = _attr(reader, "group", 1)
            per_in = np.abs(weight).reshape(group, weight.shape[0] // group, weight.shape[1], -1).max(axis=(1, 3))
            wmax = np.maximum(wmax, per_in.reshape(-1))
        chosen.append(site)
        scales[site.tensor] = smooth_scales(amax, wmax, config.alpha)
        spreads.append(spread)
    output_scales = {}
    for tensor, conv in outputs.items():
        amax = ranges[tensor].astype(np.float64)
        if amax.max() > 0 and amax.max() >= config.output_spread * np.median(amax):
            output_scales[conv] = np.maximum(amax / amax.max(), 1e-4).astype(np.float32)
    if not chosen and not output_scales:
        raise PassError(f"{PASS_NAME}: no Conv input qualifies ({len(sites)} scalable, none with channel ranges "
                        f"spread over {config.min_spread}x)")
    result = apply(model, chosen, scales)
    if output_scales:
        result = equalize_outputs(result, output_scales)
    verify_runs(result, feed, PASS_NAME)
    change = _max_relative_change(model, result, feed)
    if not change <= MAX_RELATIVE_CHANGE:
        raise PassError(f"{PASS_NAME} changed the FP32 outputs by {change:.2e} of their magnitude")
    kinds: dict[str, int] = defaultdict(int)
    for site in chosen:
        kinds[site.edits[-1].kind if site.edits[-1].kind == "conv_out" else site.edits[0].kind] += 1
    return PassResult(result, {
        "sites": len(sites),
        "equalized": len(chosen),
        "absorbed_by": dict(kinds),
        "alpha": config.alpha,
        "worst_spread_before": round(max(spreads, default=0.0), 1),
        "outputs_equalized": len(output_scales),
        "max_relative_change": change,
    })


class Equalized:
    """The equalized source per (source, config) for one auto search: every "-eq" build, its repairs and its
    calibration start from the same model object (so int8_static.SharedCalibration calibrates it once).
    Each source stays referenced here, so an id is never reused meanwhile."""

    def __init__(self) -> None:
        self._results: dict[tuple[int, EqualizeConfig], tuple[onnx.ModelProto, PassResult | PassError]] = {}

    def get(self, model: onnx.ModelProto, config: EqualizeConfig, calibration_feeds: Sequence[Feed],
            feed: Feed) -> PassResult:
        """The pass's result on `model`, run once; a PassError (nothing to equalize) is raised on every call."""
        entry = self._results.get((id(model), config))
        if entry is None or entry[0] is not model:
            try:
                outcome: PassResult | PassError = run(model, config, calibration_feeds, feed)
            except PassError as exc:
                outcome = exc
            entry = self._results[(id(model), config)] = (model, outcome)
        if isinstance(entry[1], PassError):
            raise PassError(str(entry[1]))
        return entry[1]

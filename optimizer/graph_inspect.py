"""What one looks for in Netron, as data: size, signature, and what the graph could lose or fuse.

`inspect(model)` reports the op histogram, parameters, inputs/outputs and opsets, and three kinds of
findings: redundant nodes (no-ops at inference), fusable chains that are not fused yet, and fused
ops already present. The cleanup pass uses the findings to decide what to do and to prove what it
did; `is_transformer` and `guess_attention_shape` feed ONNX Runtime's transformer optimizer.

Only the main graph's nodes are counted and matched (not those inside If/Loop/Scan bodies); the
parameters count every weight, subgraphs included.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer.loading import LoadedModel, load_model

# Activations ONNX Runtime's ConvActivationFusion folds into FusedConv on the CPU.
CONV_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid")

# Ops that are the result of a fusion (ONNX Runtime's optimizers, its transformer optimizer or its
# quantization tools). Gemm counts only with a bias (see _fused_ops), QLinear*/QOrdered* by prefix.
FUSED_OPS = (
    "FusedConv", "FusedGemm", "FusedMatMul", "NhwcConv", "NhwcFusedConv",
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization",
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "QAttention",
    "BiasGelu", "FastGelu", "Gelu", "QuickGelu", "GemmFastGelu", "BiasAdd", "BiasSoftmax", "BiasSplitGelu",
    "RotaryEmbedding", "MatMulNBits", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QGemm",
)
FUSED_PREFIXES = ("QLinear", "QOrdered")
GEMM_WITH_BIAS = "Gemm (with bias)"
QDQ_PAIR = "QuantizeLinear->DequantizeLinear"

# Pattern names used in GraphReport.fusable (stable: tests and the cleanup pass refer to them).
CONV_BN = "Conv+BatchNormalization"
CONV_ACT = "Conv+Activation"
MATMUL_ADD = "MatMul+Add"
LAYER_NORM = "LayerNorm"
GELU = "Gelu"
ATTENTION = "Attention"


@dataclass
class TensorInfo:
    """A graph input or output: dtype like "float32", shape with ints, dim names, or None (unknown)."""

    name: str
    dtype: str
    shape: list[int | str | None] | None


@dataclass
class Finding:
    """One redundant node (or a pair of them) and why it does nothing."""

    kind: str  # identity | dropout | cast_same_type | reshape_same_shape | transpose_identity | transpose_pair
    op: str
    nodes: list[str]
    reason: str


@dataclass
class FusableChain:
    """Every occurrence of one pattern that a fusion would turn into fewer nodes."""

    pattern: str
    fuses_to: str
    count: int = 0
    nodes: list[list[str]] = field(default_factory=list)


@dataclass
class GraphReport:
    node_count: int
    op_histogram: dict[str, int]
    parameter_count: int
    parameter_bytes: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    opsets: dict[str, int]
    ir_version: int
    redundant: list[Finding] = field(default_factory=list)
    fusable: list[FusableChain] = field(default_factory=list)
    fused: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (only str, int, list, dict and None)."""
        return asdict(self)

    def fusable_count(self, pattern: str) -> int:
        """How many occurrences of `pattern` (e.g. CONV_BN) are waiting to be fused; 0 when none."""
        return next((chain.count for chain in self.fusable if chain.pattern == pattern), 0)


def _dtype_name(elem_type: int) -> str:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:  # noqa: BLE001 - undefined or exotic element types
        return TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor_type = value.type.tensor_type
    shape: list[int | str | None] | None = None
    if tensor_type.HasField("shape"):
        shape = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:  # -1: an old exporter's "dynamic"
                shape.append(dim.dim_value)
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(None)
    return TensorInfo(value.name, _dtype_name(tensor_type.elem_type), shape)


def _tensor_bytes(tensor: TensorProto) -> tuple[int, int]:
    """(element count, bytes) from the dims and dtype, so external data need not be read."""
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type == TensorProto.STRING:
        return count, sum(len(s) for s in tensor.string_data)
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except Exception:  # noqa: BLE001
        itemsize = 0
    return count, count * itemsize


class _Graph:
    """Producer/consumer indexes, constants and inferred types of one graph, for pattern matching."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.nodes = list(model.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.graph_outputs = {o.name for o in model.graph.output}
        self.graph_inputs = {i.name for i in model.graph.input}
        self.values: dict[str, onnx.ValueInfoProto] = {}
        for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
            self.values[value.name] = value
        self._names = {id(node): node.name or f"{node.op_type}#{i}" for i, node in enumerate(self.nodes)}

    def name(self, node: onnx.NodeProto) -> str:
        """The node's name, or op#index for unnamed nodes so findings always point somewhere."""
        return self._names[id(node)]

    def constant(self, tensor: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, else None."""
        if tensor in self.initializers:
            init = self.initializers[tensor]
            if init.data_location == TensorProto.EXTERNAL and not init.raw_data:
                return None
            return numpy_helper.to_array(init)
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def is_constant(self, tensor: str) -> bool:
        if tensor in self.initializers:
            return True
        node = self.producer.get(tensor)
        return node is not None and node.op_type == "Constant"

    def elem_type(self, tensor: str) -> int | None:
        if tensor in self.initializers:
            return self.initializers[tensor].data_type
        value = self.values.get(tensor)
        if value is not None and value.type.tensor_type.elem_type:
            return value.type.tensor_type.elem_type
        return None

    def shape(self, tensor: str) -> list[int | str | None] | None:
        if tensor in self.initializers:
            return list(self.initializers[tensor].dims)
        value = self.values.get(tensor)
        return _tensor_info(value).shape if value is not None else None

    def parent(self, node: onnx.NodeProto, index: int, op_types: Iterable[str] | str) -> onnx.NodeProto | None:
        """The node producing input `index` of `node` if its op is one of `op_types`."""
        if index >= len(node.input):
            return None
        found = self.producer.get(node.input[index])
        ops = (op_types,) if isinstance(op_types, str) else tuple(op_types)
        return found if found is not None and found.op_type in ops else None

    def only_child(self, node: onnx.NodeProto, op_types: Iterable[str] | str) -> onnx.NodeProto | None:
        """The single consumer of the node's first output if its op is one of `op_types` and the output
        is not also a graph output (a fusion would hide it otherwise)."""
        out = node.output[0]
        children = self.consumers.get(out, [])
        ops = (op_types,) if isinstance(op_types, str) else tuple(op_types)
        if len(children) != 1 or out in self.graph_outputs or children[0].op_type not in ops:
            return None
        return children[0]

    def attr(self, node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        for attr in node.attribute:
            if attr.name == name:
                return helper.get_attribute_value(attr)
        return default


# --- redundant nodes ---------------------------------------------------------------------------

def _reshape_is_noop(g: _Graph, node: onnx.NodeProto) -> bool:
    """True when a Reshape provably returns its input's shape.

    Shape inference alone is not enough: Reshape(x[batch,16], [-1,16]) infers an anonymous first dim.
    So compare the target shape with the input's: every entry must be 0 (copy, without allowzero) or
    the same static size; one -1 is then forced to equal the remaining input dim.
    """
    in_shape = g.shape(node.input[0])
    target = g.constant(node.input[1]) if len(node.input) > 1 else None
    if in_shape is None or target is None:
        return False
    out_shape = g.shape(node.output[0])
    if out_shape is not None and out_shape == in_shape and all(d is not None for d in in_shape):
        return True
    target = [int(v) for v in np.asarray(target).reshape(-1)]
    if len(target) != len(in_shape):
        return False
    allow_zero = g.attr(node, "allowzero", 0)
    unresolved = 0
    for want, have in zip(target, in_shape, strict=True):
        if want == 0 and not allow_zero:
            continue
        if want == -1:
            unresolved += 1
        elif want != have:
            return False
    return unresolved <= 1


def _dropout_is_noop(g: _Graph, node: onnx.NodeProto) -> bool:
    """Dropout does nothing at inference unless training_mode is a constant true or its mask is used."""
    if len(node.output) > 1 and node.output[1] and (g.consumers.get(node.output[1]) or
                                                   node.output[1] in g.graph_outputs):
        return False
    if len(node.input) > 2 and node.input[2]:
        training = g.constant(node.input[2])
        return training is not None and not bool(np.asarray(training).item())
    return True


def _compose_perm(first: list[int], second: list[int]) -> list[int]:
    return [first[axis] for axis in second]


def _joins_kept_names(g: _Graph, first: onnx.NodeProto, last: onnx.NodeProto) -> bool:
    """True when no-op nodes from `first`'s input to `last`'s output join two names the graph must keep: a graph
    output computed straight from a graph input (or from another graph output). WHY not redundant: a tensor has one
    name, so removing them renames the input or the output, which callers feed and fetch by name (typed_io's
    `text` -> Identity -> `text_same` was listed as redundant, and cleanup then as redundant_left)."""
    if not first.input or not last.output:
        return False
    return last.output[0] in g.graph_outputs and (first.input[0] in g.graph_inputs or
                                                   first.input[0] in g.graph_outputs)


def find_redundant(g: _Graph) -> list[Finding]:
    findings: list[Finding] = []
    paired: set[int] = set()
    for node in g.nodes:
        name = g.name(node)
        if _joins_kept_names(g, node, node):
            continue
        if node.op_type == "Identity":
            findings.append(Finding("identity", "Identity", [name], "Identity copies its input"))
        elif node.op_type == "Dropout" and _dropout_is_noop(g, node):
            findings.append(Finding("dropout", "Dropout", [name], "Dropout is a no-op at inference"))
        elif node.op_type == "Cast":
            source = g.elem_type(node.input[0])
            if source is not None and source == g.attr(node, "to"):
                findings.append(Finding("cast_same_type", "Cast", [name],
                                        f"casts {_dtype_name(source)} to {_dtype_name(source)}"))
        elif node.op_type == "Reshape" and _reshape_is_noop(g, node):
            findings.append(Finding("reshape_same_shape", "Reshape", [name],
                                    "reshapes to the shape its input already has"))
        elif node.op_type == "Transpose" and id(node) not in paired:
            perm = g.attr(node, "perm")
            if perm is not None and list(perm) == sorted(perm):
                findings.append(Finding("transpose_identity", "Transpose", [name], "identity permutation"))
                continue
            child = g.only_child(node, "Transpose")
            child_perm = g.attr(child, "perm") if child is not None else None
            if perm is None or child_perm is None or len(perm) != len(child_perm):
                continue
            composed = _compose_perm(list(perm), list(child_perm))
            if composed == list(range(len(composed))) and not _joins_kept_names(g, node, child):
                paired.add(id(child))
                findings.append(Finding("transpose_pair", "Transpose", [name, g.name(child)],
                                        f"perm {list(perm)} then {list(child_perm)} cancel out"))
    return findings


# --- fusable chains ----------------------------------------------------------------------------

def _conv_chains(g: _Graph) -> tuple[FusableChain, FusableChain]:
    conv_bn = FusableChain(CONV_BN, "Conv (BatchNormalization folded into its weights)")
    conv_act = FusableChain(CONV_ACT, "FusedConv (ONNX Runtime extended level, CPU)")
    for node in g.nodes:
        if node.op_type != "Conv":
            continue
        tail = node
        bn = g.only_child(node, "BatchNormalization")
        if bn is not None:
            conv_bn.nodes.append([g.name(node), g.name(bn)])
            tail = bn
        act = g.only_child(tail, CONV_ACTIVATIONS)
        if act is not None:
            conv_act.nodes.append([g.name(node), *([g.name(bn)] if bn is not None else []), g.name(act)])
    return conv_bn, conv_act


def _matmul_add(g: _Graph) -> FusableChain:
    chain = FusableChain(MATMUL_ADD, "Gemm when 2-D, else a bias fused into the next op (Attention, "
                                     "SkipLayerNormalization, BiasGelu, FusedMatMul)")
    for node in g.nodes:
        if node.op_type != "MatMul" or not g.is_constant(node.input[1]):
            continue
        add = g.only_child(node, "Add")
        if add is None:
            continue
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        if g.is_constant(other):
            chain.nodes.append([g.name(node), g.name(add)])
    return chain


def _layer_norms(g: _Graph) -> FusableChain:
    """ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div, as PyTorch exports LayerNorm."""
    chain = FusableChain(LAYER_NORM, "LayerNormalization (SkipLayerNormalization with the residual Add)")
    for div in g.nodes:
        if div.op_type != "Div":
            continue
        sqrt = g.parent(div, 1, "Sqrt")
        add = g.parent(sqrt, 0, "Add") if sqrt else None
        if add is None:
            continue
        var = g.parent(add, 0, "ReduceMean") or g.parent(add, 1, "ReduceMean")
        square = g.parent(var, 0, ("Pow", "Mul")) if var else None
        sub = g.parent(square, 0, "Sub") if square else None
        mean = g.parent(sub, 1, "ReduceMean") if sub else None
        if mean is None or div.input[0] != sub.output[0] or mean.input[0] != sub.input[0]:
            continue
        chain.nodes.append([g.name(n) for n in (mean, sub, square, var, add, sqrt, div)])
    return chain


def _gelus(g: _Graph) -> FusableChain:
    """x * 0.5 * (1 + Erf(x / sqrt(2))) in its usual exported orders."""
    chain = FusableChain(GELU, "Gelu (BiasGelu with the MatMul bias before it)")
    for erf in g.nodes:
        if erf.op_type != "Erf":
            continue
        scale = g.parent(erf, 0, ("Div", "Mul"))
        one_plus = g.only_child(erf, "Add")
        mul = g.only_child(one_plus, "Mul") if one_plus else None
        if scale is None or mul is None:
            continue
        x = scale.input[0]
        other = mul.input[1] if mul.input[0] == one_plus.output[0] else mul.input[0]
        nodes = [scale, erf, one_plus, mul]
        if other == x:  # (x * (1 + erf)) * 0.5
            half = g.only_child(mul, "Mul")
            if half is None:
                continue
            nodes.append(half)
        else:  # (x * 0.5) * (1 + erf)
            half = g.producer.get(other)
            if half is None or half.op_type != "Mul" or x not in half.input:
                continue
            nodes.insert(0, half)
        chain.nodes.append([g.name(n) for n in nodes])
    return chain


def _attentions(g: _Graph) -> FusableChain:
    """MatMul(q, k) -> [Div|Mul scale] -> [Add mask] -> Softmax -> MatMul(probs, v), on activations."""
    # WHY the hedge: ONNX Runtime's optimizer fuses BERT-style exports; torch 2.13's nn.MultiheadAttention and
    # F.scaled_dot_product_attention (either exporter) came out with 0 Attention ops (cleanup's attention_left).
    chain = FusableChain(ATTENTION, "Attention / MultiHeadAttention where ONNX Runtime's transformer optimizer "
                                    "recognises the pattern (BERT-style exports; not torch's nn.MultiheadAttention "
                                    "or F.scaled_dot_product_attention)")
    for softmax in g.nodes:
        if softmax.op_type != "Softmax":
            continue
        context = g.only_child(softmax, "MatMul")
        if context is None or g.is_constant(context.input[1]):
            continue
        nodes = [softmax, context]
        current = softmax
        for optional in ("Add", ("Div", "Mul")):
            parent = g.parent(current, 0, optional)
            if parent is not None:
                nodes.insert(0, parent)
                current = parent
        scores = g.parent(current, 0, "MatMul")
        if scores is None or any(g.is_constant(t) for t in scores.input):
            continue
        nodes.insert(0, scores)
        chain.nodes.append([g.name(n) for n in nodes])
    return chain


def find_fusable(g: _Graph) -> list[FusableChain]:
    chains = [*_conv_chains(g), _matmul_add(g), _layer_norms(g), _gelus(g), _attentions(g)]
    for chain in chains:
        chain.count = len(chain.nodes)
    return [chain for chain in chains if chain.count]


def find_fused(g: _Graph) -> dict[str, int]:
    fused: Counter[str] = Counter()
    for node in g.nodes:
        if node.op_type in FUSED_OPS or node.op_type.startswith(FUSED_PREFIXES):
            fused[node.op_type] += 1
        elif node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            fused[GEMM_WITH_BIAS] += 1
        elif node.op_type == "QuantizeLinear" and any(
            child.op_type == "DequantizeLinear" for child in g.consumers.get(node.output[0], [])
        ):
            fused[QDQ_PAIR] += 1
    return dict(sorted(fused.items(), key=lambda item: (-item[1], item[0])))


# --- already quantized ---------------------------------------------------------------------------

# Ops that compute on (or carry) integer-quantized tensors: ONNX's QDQ and QOperator formats and ONNX Runtime's
# quantized contrib ops (QLinear*/QOrdered* by prefix), and its low-bit weight MatMul.
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "QGemm",
                 "MatMulNBits")


def quantized_ops(report: GraphReport) -> dict[str, int]:
    """The quantized ops in the main graph and how many of each (empty: a float model)."""
    return {op: n for op, n in report.op_histogram.items()
            if op in QUANTIZED_OPS or op.startswith(FUSED_PREFIXES)}


def already_quantized(model: onnx.ModelProto | GraphReport) -> str | None:
    """A note for a model that is already quantized (None for a float model): INT8 variants of it are not worth
    building. WHY: onnxforge's own dynamic-INT8 transformer given back to it was quantized again on top of its
    QAttention/MatMulInteger; every such variant was slower and spent the time budget, and nothing said why."""
    found = quantized_ops(model if isinstance(model, GraphReport) else inspect(model))
    if not found:
        return None
    ops = ", ".join(f"{op} x{n}" for op, n in found.items())
    return (f"the model is already quantized ({ops}): INT8 variants are not built (quantizing it again rounds what "
            "is already rounded; an INT8 transformer quantized again was slower in every variant)")


# --- the report ---------------------------------------------------------------------------------

def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred shapes; the model itself when inference fails (the report still works)."""
    if model.ByteSize() > 2**31 - 1:  # infer_shapes serialises the proto, which protobuf caps at 2 GB
        return model
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a report without inferred shapes is still useful
        return model


def _graph_tensors(graph: onnx.GraphProto) -> Iterable[TensorProto]:
    """Initializers and Constant values of a graph and of every If/Loop/Scan body in it: a model that keeps
    its weights in a branch (silero VAD: 2.3 MB, all inside an If) would otherwise count ~0 parameters."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_tensors(sub)


def _parameters(model: onnx.ModelProto) -> tuple[int, int]:
    """Elements and bytes of every weight, subgraphs included (the op counts cover the main graph only)."""
    tensors = list(_graph_tensors(model.graph))
    count = total = 0
    for tensor in tensors:
        n, size = _tensor_bytes(tensor)
        count += n
        total += size
    return count, total


def inspect(model: onnx.ModelProto | LoadedModel | str | Path | bytes) -> GraphReport:
    """Describe the model's main graph and list what cleanup and fusion could do to it.

    A path or bytes is loaded and validated first (`load_model`: an OptimizerError says what is wrong with it), as
    `optimize` takes them; a LoadedModel is described as loaded (with the shapes inference added).
    """
    if isinstance(model, LoadedModel):
        model = model.proto
    elif not isinstance(model, onnx.ModelProto):
        model = load_model(model).proto
    inferred = _with_shapes(model)
    g = _Graph(inferred)
    initializer_names = set(g.initializers)
    histogram = Counter(node.op_type for node in model.graph.node)
    params, param_bytes = _parameters(model)
    return GraphReport(
        node_count=len(model.graph.node),
        op_histogram=dict(sorted(histogram.items(), key=lambda item: (-item[1], item[0]))),
        parameter_count=params,
        parameter_bytes=param_bytes,
        inputs=[_tensor_info(v) for v in model.graph.input if v.name not in initializer_names],
        outputs=[_tensor_info(v) for v in model.graph.output],
        opsets={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        ir_version=model.ir_version,
        redundant=find_redundant(g),
        fusable=find_fusable(g),
        fused=find_fused(g),
    )


_TRANSFORMER_FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "QAttention",
                      "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                      "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization")


def is_transformer(report: GraphReport) -> bool:
    """True when the graph has attention or LayerNorm (fused or not): the transformer optimizer applies."""
    if report.fusable_count(ATTENTION) or report.fusable_count(LAYER_NORM):
        return True
    return any(op in report.fused for op in _TRANSFORMER_FUSED)


def _reshape_target(g: _Graph, tensor: str) -> list[int | None] | None:
    """The entries of a Reshape's target shape: a constant, or a Concat of one-entry pieces (None where a
    piece is computed, such as the batch and sequence sizes taken from Shape)."""
    value = g.constant(tensor)
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)]
    concat = g.producer.get(tensor)
    if concat is None or concat.op_type != "Concat":
        return None
    entries: list[int | None] = []
    for piece in concat.input:
        part = g.constant(piece)
        if part is None:
            entries.append(None)  # a computed size (Unsqueeze of a Gather of a Shape): one entry
        elif np.asarray(part).size == 1:
            entries.append(int(np.asarray(part).reshape(-1)[0]))
        else:
            return None
    return entries


def guess_attention_shape(model: onnx.ModelProto) -> tuple[int | None, int | None]:
    """(num_heads, hidden_size) for the transformer optimizer, or None for what the graph does not tell.

    Heads come from the Reshape that splits heads: a target [batch, seq, heads, head_dim] with a positive
    head_dim, either constant or a Concat of pieces. Current PyTorch/transformers exports write
    view(batch, seq, -1, head_dim) as Concat(Unsqueeze(..), Unsqueeze(..), [-1], [head_dim]) (MiniLM's
    attention was left unfused for lack of heads); there heads = the projection's width / head_dim.
    The hidden size is heads * head_dim, confirmed by the weight of the MatMul feeding that Reshape
    (through its bias Add) when there is one. The most frequent answer wins, so an odd Reshape elsewhere
    in the graph does not decide.
    """
    g = _Graph(model)
    votes: Counter[tuple[int, int]] = Counter()
    for node in g.nodes:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        target = _reshape_target(g, node.input[1])
        if target is None or len(target) != 4 or target[3] is None or target[3] <= 0:
            continue
        heads, head_dim = target[2], target[3]
        width = None
        source = g.parent(node, 0, ("Add", "MatMul"))
        if source is not None and source.op_type == "Add":
            source = g.parent(source, 0, "MatMul") or g.parent(source, 1, "MatMul")
        if source is not None and source.op_type == "MatMul":
            weight = g.constant(source.input[1])
            if weight is not None and weight.ndim == 2:
                width = int(weight.shape[1])
        if heads is None or heads <= 0:  # -1 (inferred) or computed: the projection's width tells
            if width is None or width % head_dim:
                continue
            heads = width // head_dim
        hidden = heads * head_dim
        if width is not None and width != hidden:
            continue  # a Reshape of something else that happens to have four entries
        votes[(heads, hidden)] += 1
    if not votes:
        return None, None
    heads, hidden = votes.most_common(1)[0][0]
    return heads, hidden

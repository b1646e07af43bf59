"""INT8 dynamic quantization: weights to int8 offline, activations quantized at run time.

No calibration set is needed, which makes it the INT8 pass for MatMul-heavy and recurrent models
(transformers, RNNs) when the user sent no samples. Calls ONNX Runtime's `quantize_dynamic`.

Also home of what both INT8 passes share: `pre_process` (ONNX Runtime's `quant_pre_process` with
the fallbacks real models need) and `count_quantized_ops` (the proof that quantization happened).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
from onnx import TensorProto
from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

from optimizer.errors import PassError, first_line
from optimizer.passes.base import PassResult, verify_runs

PASS_NAME = "int8 dynamic"

# Ops that only exist in a quantized graph. A "quantized" model with none of them is a no-op.
QUANTIZED_OP_TYPES = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM", "QGemm", "QAttention", "QEmbedLayerNormalization",
})

_WEIGHT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes.extend(_all_nodes(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    nodes.extend(_all_nodes(sub))
    return nodes


def count_quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each quantized op type the model holds (QLinear* included), subgraphs too."""
    counts = Counter(
        node.op_type for node in _all_nodes(model.graph)
        if node.op_type in QUANTIZED_OP_TYPES or node.op_type.startswith("QLinear")
    )
    return dict(sorted(counts.items()))



def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def untyped_tensors(model: onnx.ModelProto) -> list[str]:
    """Tensors that nodes read or write but no value_info, graph input or output gives an element type.

    ORT's quantizers and calibrators read only element types from value_info (`is_float_tensor`,
    `get_tensor_type`, `select_tensors_to_calibrate`), never dims, and a tensor missing there is left
    unquantized or raises. Subgraphs are included: their nodes are quantized too.
    """
    graphs, nodes = [model.graph], _all_nodes(model.graph)
    for node in nodes:
        for attr in node.attribute:
            graphs += [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    typed = {v.name for g in graphs for v in [*g.value_info, *g.input, *g.output] if v.type.tensor_type.elem_type}
    constants = {t.name for g in graphs for t in g.initializer}
    return sorted({name for node in nodes for name in [*node.input, *node.output]
                   if name and name not in typed and name not in constants})


def pre_process(model: onnx.ModelProto, workdir: Path, pass_name: str) -> tuple[Path, list[str]]:
    """Run `quant_pre_process` and return the path of the model to quantize, plus notes.

    Its ORT optimization also turns Constant nodes into initializers, which `quantize_dynamic`
    requires ("Expected ... to be an initializer"). Its first step, ORT's symbolic shape inference
    (sympy), gives tensors symbolic dims and types that ONNX's shape inference (its last step) cannot
    infer, e.g. contrib ops' outputs; it costs 31 s on PP-OCRv4 det (Resize) and 12 s on YOLOv8n. The
    quantizers read element types only (`untyped_tensors`), so it runs only when the steps after it
    leave a tensor without one; on the 12 real models it changed no node, only dims (and typed
    MiniLM's two untyped EmbedLayerNormalization outputs). It fails on many real models unless
    `auto_merge=True`, and on compute inside If branches even then: then the untyped result is used.
    """
    source = workdir / "input.onnx"
    onnx.save_model(model, source)
    target = workdir / "preprocessed.onnx"
    untyped: list[str] | None = None
    try:
        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
        untyped = untyped_tensors(onnx.load_model(target, load_external_data=False))
    except Exception as exc:  # noqa: BLE001 - ORT and ONNX raise anything
        cheap_error = first_line(exc)
    if untyped == []:
        return target, ["quant_pre_process: symbolic shape inference skipped (ONNX shape inference typed every "
                        "tensor; the quantizers read no dims)"]
    without_symbols = workdir / "without_symbols.onnx"
    if untyped:
        target.replace(without_symbols)
    try:
        quant_pre_process(str(source), str(target), auto_merge=True)
        why = f"{len(untyped)} tensors untyped without it, e.g. {untyped[0]}" if untyped else cheap_error
        return target, [f"quant_pre_process: symbolic shape inference with auto_merge ({why})"]
    except Exception as exc:  # noqa: BLE001 - sympy and ORT raise anything
        symbolic_error = first_line(exc)
    if untyped is None:
        raise PassError(f"{pass_name}: quant_pre_process failed: {cheap_error}")
    without_symbols.replace(target)
    return target, [f"quant_pre_process: symbolic shape inference failed ({symbolic_error}); "
                    f"{len(untyped)} tensors have no type, e.g. {untyped[0]}"]


def map_node_names(names: Sequence[str], model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Translate node names of the caller's model into the pre-processed model's names, plus notes.

    quant_pre_process's fusions rename nodes ("MatMul_3" becomes "MatMul_3/MatMulAddFusion"), so a
    name the caller took from its own model would silently exclude nothing.
    """
    present = [n.name for n in _all_nodes(model.graph)]
    mapped: list[str] = []
    unmatched: list[str] = []
    for name in names:
        matches = [p for p in present if p == name or p.startswith(name + "/")]
        mapped.extend(matches)
        if not matches:
            unmatched.append(name)
    notes = []
    if unmatched:
        notes.append(f"nodes_to_exclude: {unmatched} match no node after quant_pre_process (fused away or misspelled)")
    return mapped, notes


def require_quantized(model: onnx.ModelProto, source: onnx.ModelProto, pass_name: str) -> dict[str, int]:
    """The quantized op counts, or PassError when the tool quantized nothing (a fake success)."""
    counts = count_quantized_ops(model)
    if not counts:
        ops = ", ".join(sorted({n.op_type for n in source.graph.node}))
        raise PassError(
            f"{pass_name} quantized no op: none of the model's top-level ops ({ops}) was quantized. Compute "
            "inside If/Loop branches is invisible to the quantizer, and some op types have no INT8 kernel; "
            "the FP32 or FP16 model is the better artifact"
        )
    return counts


def model_key(model: onnx.ModelProto) -> str:
    """A model's identity for the search's caches (this one and int8_static.SharedCalibration)."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


class ModelKeys:
    """`model_key` once per model object: serializing and hashing MiniLM's 90 MB costs 0.3 s idle and
    0.8-1.2 s at load 4-5, on each of ~20 builds per search, and a search hands every build of a source the
    same object. Callers must not edit a model between builds (a search never does). Each model stays
    referenced, so its id is never reused meanwhile."""

    def __init__(self) -> None:
        self._keys: dict[int, tuple[onnx.ModelProto, str]] = {}

    def __call__(self, model: onnx.ModelProto) -> str:
        entry = self._keys.get(id(model))
        if entry is None or entry[0] is not model:
            entry = self._keys[id(model)] = (model, model_key(model))
        return entry[1]


class Preprocessed:
    """quant_pre_process's output per source model, for every INT8 build of one auto search.

    A mixed-precision repair builds the same source again and again with other nodes left in float,
    and the static and dynamic builds of a search pre-process the same source (int8_static.SharedCalibration
    asks this cache too): pre-processing MiniLM costs about as much as quantizing it (2-4 s each), and
    depends on the source only.
    """

    def __init__(self) -> None:
        self._models: dict[str, tuple[bytes, list[str]]] = {}
        self.key = ModelKeys()  # a source's identity, hashed once per search (shared with SharedCalibration)
        self.runs = 0  # quant_pre_process runs
        self.reused = 0  # builds that skipped quant_pre_process

    def path(self, model: onnx.ModelProto, workdir: Path, pass_name: str) -> tuple[Path, list[str]]:
        """`pre_process(model, workdir, pass_name)`, from the cache when this source was pre-processed before."""
        key = self.key(model)
        if key not in self._models:
            source, notes = pre_process(model, workdir, pass_name)
            self.runs += 1
            self._models[key] = (source.read_bytes(), notes)
            return source, notes
        self.reused += 1
        data, notes = self._models[key]
        target = workdir / "preprocessed.onnx"
        target.write_bytes(data)
        return target, list(notes)


@dataclass(frozen=True)
class Int8DynamicConfig:
    weight_type: Literal["int8", "uint8"] = "int8"
    # Per-channel weights lifted a transformer's embedding cosine from 0.958 to 0.993 (pitfalls.md).
    per_channel: bool = False
    # 7-bit weights: x86 without VNNI sums u8*s8 pairs in int16 and saturates (see int8_static.Int8StaticConfig)
    reduce_range: bool = False
    op_types: Sequence[str] | None = None  # None: every type ORT can quantize dynamically
    nodes_to_exclude: Sequence[str] = ()  # names in the given model; fused nodes keep them as a prefix


def run(model: onnx.ModelProto, config: Int8DynamicConfig, feed: dict,
        prepared: Preprocessed | None = None) -> PassResult:
    """Quantize weights to int8 with `quantize_dynamic`; PassError if nothing was quantized or it fails to run.

    `prepared`: the search's cache of pre-processed sources, so repeated builds of one source skip quant_pre_process.
    """
    if config.weight_type not in _WEIGHT_TYPES:
        raise PassError(f"{PASS_NAME}: weight_type must be one of {sorted(_WEIGHT_TYPES)}, not {config.weight_type!r}")
    with tempfile.TemporaryDirectory(prefix="onnxforge-int8d-") as tmp:
        workdir = Path(tmp)
        source, notes = (prepared.path if prepared else pre_process)(model, workdir, PASS_NAME)
        preprocessed = onnx.load_model(source)
        excluded, exclude_notes = map_node_names(config.nodes_to_exclude, preprocessed)
        notes += exclude_notes
        # quantize_dynamic rewrites Gemm into MatMul + Add named "<gemm>_MatMul" before it applies exclusions.
        gemms = {n.name for n in preprocessed.graph.node if n.op_type == "Gemm"}
        excluded += [f"{name}_MatMul" for name in excluded if name in gemms]
        target = workdir / "quantized.onnx"
        try:
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=list(config.op_types) if config.op_types else None,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                weight_type=_WEIGHT_TYPES[config.weight_type],
                nodes_to_exclude=excluded,
                # Tensors whose type shape inference lost (after contrib-op fusions) are float weights.
                extra_options={"DefaultTensorType": TensorProto.FLOAT},
            )
            quantized = onnx.load_model(target)
        except Exception as exc:  # noqa: BLE001 - the tool raises anything
            raise PassError(f"{PASS_NAME}: quantize_dynamic failed: {first_line(exc)}") from None
    counts = require_quantized(quantized, model, PASS_NAME)
    verify_runs(quantized, feed, PASS_NAME)
    changes = {
        "quantized_ops": counts,
        "weight_type": config.weight_type,
        "per_channel": config.per_channel,
        "reduce_range": config.reduce_range,
        "nodes_before": len(model.graph.node),
        "nodes_after": len(quantized.graph.node),
        "op_histogram_after": op_histogram(quantized),
    }
    return PassResult(quantized, changes, notes)

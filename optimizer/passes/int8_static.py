"""INT8 static quantization: weights and activations to int8, activation ranges from calibration samples.

The INT8 pass for CNNs. Uses ONNX Runtime's tools: `quant_pre_process`, its calibrators
(`create_calibrator`: MinMax, Entropy, Percentile) and `quantize_static` (QDQ format by default,
QOperator on request). We run the calibrator ourselves and hand `quantize_static` the ranges through
its calibration cache instead of a data reader, because inside `quantize_static`:
- Entropy is built with 128 histogram bins for 128 quantized bins, which leaves a single candidate
  threshold (the full range): "entropy" silently equals MinMax, and the bin counts cannot be passed;
- memory can only be bounded with `CalibStridedMinMax` (the stride must divide the sample count) or
  `CalibMaxIntermediateOutputs`, which in ORT 1.32 drops data instead of merging it (pitfalls.md).
Our own chunked feeding holds at most `memory_budget_bytes` of activations (estimated from shape
inference) whatever the method: the calibrators merge ranges and histograms across calls. The
histogram methods get optimizer.histograms' collector, whose entropy threshold search gives ORT's
thresholds ~10x faster (PP-OCRv4 det: ORT's search 251 s after a 32 s collection, ours 19 s).
Also from real models: per-channel weights need opset >= 13 (DequantizeLinear `axis`) or the tool
writes an invalid file without warning, so older models are converted first; a result with no
quantized op, a tool exception or a model that does not run is a PassError, except when leaving a
few nodes in float gets the tool through (`_quantize_around_crashes`).
A search that builds many variants of one model passes a `SharedCalibration`: one pre-processed
model and one calibration per method serve every format, activation type, scope and repair.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import CalibraterBase, TensorsData, create_calibrator, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from optimizer.errors import CalibrationError, PassError, first_line
from optimizer.histograms import use_fast_collector
from optimizer.passes.base import PassResult, verify_runs
from optimizer.passes.int8_dynamic import (
    Preprocessed,
    _all_nodes,
    map_node_names,
    op_histogram,
    pre_process,
    require_quantized,
)

PASS_NAME = "int8 static"
PER_CHANNEL_MIN_OPSET = 13
DEFAULT_MEMORY_BUDGET = 1536 * 1024**2  # activation bytes the calibrator may hold at once (~1.5 GB)

_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
# TensorRT's entropy recipe: a fine histogram searched for the threshold that 128 quantized bins
# (one side of int8) represent best.
ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128
# quantize_static's extra_options that configure its calibrator, and the calibrator's names for them.
_CALIBRATOR_OPTIONS = {
    "CalibTensorRangeSymmetric": "symmetric",
    "CalibMovingAverage": "moving_average",
    "CalibMovingAverageConstant": "averaging_constant",
    "CalibPercentile": "percentile",
}

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Int8StaticConfig:
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    quant_format: Literal["qdq", "qoperator"] = "qdq"
    # S8S8 QDQ is ORT's documented default; U8 activations measured faster on this CPU (pitfalls.md).
    activation_type: Literal["int8", "uint8"] = "int8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    # 7-bit weights: on x86 without VNNI, U8S8 kernels sum u8*s8 pairs in int16 (vpmaddubsw) and saturate; with
    # weights in [-64, 64] a pair stays below 2 * 255 * 64 = 32640 (ORT's quantize_static docstring advises it there)
    reduce_range: bool = False
    op_types: Sequence[str] | None = None  # None: every type ORT can quantize; ("Conv", "MatMul", "Gemm") is safer
    nodes_to_exclude: Sequence[str] = ()  # names in the given model; fused nodes keep them as a prefix
    extra_options: dict[str, Any] = field(default_factory=dict)  # passed to quantize_static as is
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET


class _FeedReader(CalibrationDataReader):
    """Hands a list of feeds to ORT's calibrator, one per `get_next`."""

    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._feeds, None)


def _check_config(config: Int8StaticConfig) -> None:
    for label, value, allowed in (
        ("method", config.method, _METHODS),
        ("quant_format", config.quant_format, _FORMATS),
        ("activation_type", config.activation_type, _TYPES),
        ("weight_type", config.weight_type, _TYPES),
    ):
        if value not in allowed:
            raise PassError(f"{PASS_NAME}: {label} must be one of {sorted(allowed)}, not {value!r}")
    if config.activation_type == "int8" and config.weight_type == "uint8":
        raise PassError(f"{PASS_NAME}: ONNX Runtime has no kernels for int8 activations with uint8 weights; "
                        "use int8 weights")
    for option in ("CalibMaxIntermediateOutputs", "CalibStridedMinMax", "SmoothQuant"):
        if option in config.extra_options:
            raise PassError(f"{PASS_NAME}: extra option {option} is not supported here (calibration runs in "
                            "chunks bounded by memory_budget_bytes; SmoothQuant needs neural-compressor)")


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _to_per_channel_opset(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """Per-channel DequantizeLinear needs `axis` (opset 13); the tool does not convert by itself."""
    opset = _default_opset(model)
    if opset >= PER_CHANNEL_MIN_OPSET:
        return model
    try:
        converted = version_converter.convert_version(model, PER_CHANNEL_MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001
        raise PassError(
            f"{PASS_NAME}: per-channel weights need opset {PER_CHANNEL_MIN_OPSET} but converting the model from "
            f"opset {opset} failed ({first_line(exc)}); try per_channel=False"
        ) from None
    notes.append(f"opset converted from {opset} to {PER_CHANNEL_MIN_OPSET} for per-channel weights")
    return converted


def activation_bytes_per_sample(model: onnx.ModelProto, feed: Feed) -> tuple[int, int]:
    """Estimated bytes of the float tensors one run on `feed` produces, and how many had no known shape.

    Calibration captures every float tensor of the graph, so their sum is what one sample costs.
    Named dynamic dims take their size from the feed; other unknown dims the largest size the feed
    gives a dynamic dim (an overestimate rather than an underestimate).
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    sizes: dict[str, int] = {}
    for value in inferred.graph.input:
        if value.name in feed:
            for dim, size in zip(value.type.tensor_type.shape.dim, feed[value.name].shape, strict=False):
                if dim.dim_param:
                    sizes[dim.dim_param] = int(size)
    fallback = max(sizes.values(), default=1)
    total, unknown = 0, 0
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            continue
        if not tensor_type.HasField("shape"):
            unknown += 1
            continue
        count = 1
        for dim in tensor_type.shape.dim:
            count *= dim.dim_value if dim.dim_value > 0 else sizes.get(dim.dim_param, fallback)
        total += count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
    return total, unknown


def calibration_chunk(samples: int, bytes_per_sample: int, budget: int, histogram: bool) -> int:
    """Samples the calibrator may hold at once within `budget` bytes (at least 1).

    Histogram methods copy each chunk once more while binning it, so they get half the budget.
    """
    budget = budget // 2 if histogram else budget
    return max(1, min(samples, budget // max(bytes_per_sample, 1)))


def _calibrator_options(config: Int8StaticConfig) -> dict[str, Any]:
    options = {name: config.extra_options[key] for key, name in _CALIBRATOR_OPTIONS.items()
               if key in config.extra_options}
    if config.method == "entropy":
        options.setdefault("num_bins", ENTROPY_BINS)
        options.setdefault("num_quantized_bins", ENTROPY_QUANTIZED_BINS)
    return options


def _collect(source: Path, workdir: Path, config: Int8StaticConfig, feeds: Sequence[Feed], chunk: int,
             op_types: list[str] | None) -> TensorsData:
    """Run ORT's calibrator chunk by chunk (None: every float tensor of the graph)."""
    calibrator = create_calibrator(
        source,
        op_types,
        augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=_METHODS[config.method],
        extra_options=_calibrator_options(config),
    )
    use_fast_collector(calibrator)  # ORT's entropy threshold search, vectorised with the same results
    for start in range(0, len(feeds), chunk):
        calibrator.collect_data(_FeedReader(feeds[start : start + chunk]))
    return calibrator.compute_data()


def _calibrate(source: Path, workdir: Path, config: Int8StaticConfig, feeds: Sequence[Feed], chunk: int,
               op_types: list[str]) -> Path:
    """Collect activation ranges chunk by chunk and write them as a quantize_static calibration cache."""
    cache = workdir / "calibration.json"
    save_tensors_data(_collect(source, workdir, config, feeds, chunk, op_types), cache)
    return cache


@dataclass
class _Prepared:
    """A pre-processed model and what calibrating it costs, shared by every build of one source."""

    model_bytes: bytes
    notes: list[str]
    per_sample: int
    unknown: int


@dataclass
class _Ranges:
    """One method's ranges for every float tensor, and which tensors each op type's nodes touch."""

    data: TensorsData
    tensors_by_op: dict[str, set[str]]

    def scoped(self, op_types: Sequence[str]) -> TensorsData:
        """The ranges a calibrator restricted to `op_types` would have computed (same tensors, same values).

        Only those tensors: quantize_static treats "has a range" as "quantize it" in places (a Relu's
        input takes its output's range only when both have one), so extra ranges would change the model.
        """
        wanted: set[str] = set()
        for op_type in op_types:
            wanted |= self.tensors_by_op.get(op_type, set())
        return TensorsData(self.data.calibration_method, {k: v for k, v in self.data.items() if k in wanted})


class SharedCalibration:
    """Work every static build of one search shares: one pre-processed model, one calibration per method.

    The activation ranges depend only on the float model, the samples and the method, not on the
    quant format, the activation type, the op-type scope or the nodes a repair leaves in float; yet
    each quantize_static run calibrates again (20-35 s per build on real models). So the first build
    with a method calibrates every float tensor once, and each build hands quantize_static the subset
    its scope needs through the calibration cache, which gives the same ranges and the same model as
    calibrating itself (tests/test_int8_static.py). It also remembers the nodes that made the tool
    crash for a configuration, so a repair does not search for them again. One instance per sample
    set: the samples are part of every key. `preprocessed`: the search's quant_pre_process cache, shared
    with its dynamic builds (the same source is pre-processed once, not once per mode).
    """

    def __init__(self, preprocessed: Preprocessed | None = None) -> None:
        self.preprocessed = preprocessed or Preprocessed()
        self._prepared: dict[tuple, _Prepared] = {}
        self._ranges: dict[tuple, _Ranges] = {}
        self._tool_excluded: dict[tuple, list[str]] = {}
        self._samples: dict[tuple[int, ...], list[Feed]] = {}
        self.calibrations: list[dict[str, Any]] = []  # {method, seconds, tensors}: one per calibration run
        self.key = self.preprocessed.key  # a source's identity, hashed once per search
        self.reused = 0  # builds that got their ranges from here instead of calibrating

    def samples_key(self, feeds: Sequence[Feed]) -> tuple[int, ...]:
        """Identity of a sample list by its arrays (a slice of the same list gives the same key); the
        arrays are kept referenced so that an id is never reused by other data while this cache lives."""
        key = tuple(id(array) for feed in feeds for array in feed.values())
        self._samples.setdefault(key, list(feeds))
        return key

    def prepared(self, key: tuple, make: Any) -> _Prepared:
        if key not in self._prepared:
            self._prepared[key] = make()
        return self._prepared[key]

    def ranges(self, key: tuple, make: Any) -> tuple[_Ranges, bool]:
        """The ranges for `key`, computed by `make()` on first use; True when they were reused."""
        if key in self._ranges:
            self.reused += 1
            return self._ranges[key], True
        self._ranges[key] = make()
        return self._ranges[key], False

    def calibrated(self, method: str) -> bool:
        """True when a later build with `method` costs no calibration (its ranges are here)."""
        return any(c["method"] == method for c in self.calibrations)

    def tool_excluded(self, key: tuple) -> list[str]:
        return self._tool_excluded.setdefault(key, [])


def _tensors_by_op(source: Path) -> dict[str, set[str]]:
    """For each op type, the tensors ORT's calibrator selects when told to calibrate that op type only.

    Asks the calibrator's own selection (`select_tensors_to_calibrate` on the model it loads with
    shape inference), so the subset for a scope is exactly what a scoped calibration would cover.
    """
    base = CalibraterBase(source, op_types_to_calibrate=None)
    result = {}
    for op_type in sorted({n.op_type for n in base.model.graph.node}):
        base.op_types_to_calibrate = [op_type]
        result[op_type] = set(base.select_tensors_to_calibrate(base.model)[0])
    return result


def _prepare(model: onnx.ModelProto, per_channel: bool, workdir: Path, first_feed: Feed,
             preprocessed: Preprocessed | None = None) -> _Prepared:
    """Opset conversion (per-channel), quant_pre_process and the memory estimate: once per source in a search.

    `preprocessed`: the search's quant_pre_process cache; a model that needed no opset conversion is the
    dynamic builds' source too, and is pre-processed once for both.
    """
    notes: list[str] = []
    source_model = _to_per_channel_opset(model, notes) if per_channel else model
    source, pre_notes = (preprocessed.path if preprocessed else pre_process)(source_model, workdir, PASS_NAME)
    preprocessed = onnx.load_model(source)
    per_sample, unknown = activation_bytes_per_sample(preprocessed, first_feed)
    return _Prepared(source.read_bytes(), notes + pre_notes, per_sample, unknown)


#: Nodes the crash search may leave in float before it gives up (each costs ~log2(nodes) quantize runs).
MAX_TOOL_EXCLUSIONS = 4


def _quantize(source: Path, target: Path, cache: Path, config: Int8StaticConfig, op_types: list[str],
              excluded: Sequence[str], feed: Feed) -> onnx.ModelProto:
    """One quantize_static run from cached ranges, checked to load and run; raises on any failure."""
    if target.exists():
        target.unlink()
    quantize_static(
        source,
        target,
        calibration_data_reader=None,
        calibration_cache_path=cache,
        quant_format=_FORMATS[config.quant_format],
        op_types_to_quantize=op_types,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        activation_type=_TYPES[config.activation_type],
        weight_type=_TYPES[config.weight_type],
        nodes_to_exclude=list(excluded),
        calibrate_method=_METHODS[config.method],
        extra_options=dict(config.extra_options),
    )
    quantized = pin_float(onnx.load_model(target), excluded)
    verify_runs(quantized, feed, PASS_NAME)
    return quantized


def _channel_axis(dims: Sequence[int] | None) -> int | None:
    """An axis of known size > 1 for a per-axis DequantizeLinear: the channel axis (1) first, then any other."""
    if not dims:
        return None
    order = [1, *[i for i in range(len(dims)) if i != 1]] if len(dims) > 1 else [0]
    return next((axis for axis in order if dims[axis] > 1), None)


def pin_float(model: onnx.ModelProto, excluded: Sequence[str]) -> onnx.ModelProto:
    """Keep the excluded nodes float in ONNX Runtime too, not only in the file: returns `model`, edited in place.

    A node left out of quantization still reads a DequantizeLinear wherever its producer was quantized, and
    writes into a QuantizeLinear wherever its consumer was: then ONNX Runtime's session-time graph optimizer
    quantizes it again. Its WeightBiasQuantization gives a Conv/Gemm that reads a per-tensor DequantizeLinear
    and has a float weight a per-tensor INT8 weight (worse than the per-channel one the quantizer would have
    given), and the QDQ fusion then makes it a QLinearConv: on PP-OCRv4 det, 10 of 12 Convs excluded from an
    all-op U8S8 build (QDQ and QOperator alike) ran as QLinearConv, so every such repair attempt was a no-op or
    worse. Both steps only match a per-tensor DequantizeLinear, so each excluded node reads its own copy with the
    same scale and zero point repeated along one axis (per-axis: the same values, which that optimizer leaves
    alone). Needs opset 13 (DequantizeLinear's `axis`); a tensor with no known axis longer than 1 is left as is.
    """
    wanted = set(excluded)
    if not wanted or next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 13:
        return model
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    reads = [(node, i, producers[name]) for node in model.graph.node if node.name in wanted
             for i, name in enumerate(node.input)
             if name in producers and producers[name].op_type == "DequantizeLinear"
             and producers[name].input[0] not in initializers and producers[name].input[1] in initializers
             and int(np.prod(initializers[producers[name].input[1]].dims)) == 1]
    if not reads:
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    copies: dict[str, str] = {}  # dequantized tensor -> its per-axis copy
    position = {n.output[0]: i for i, n in enumerate(model.graph.node) if n.output}  # by output: protobuf wrappers
    inserts: list[tuple[int, onnx.NodeProto]] = []
    for node, i, dq in reads:
        tensor = node.input[i]
        if tensor not in copies:
            axis = _channel_axis(dims.get(tensor))
            if axis is None:
                continue
            size = dims[tensor][axis]
            inputs = [dq.input[0]]
            for j, suffix in ((1, "scale"), (2, "zero_point")):
                if j < len(dq.input) and dq.input[j]:
                    value = numpy_helper.to_array(initializers[dq.input[j]]).reshape(())
                    repeated = numpy_helper.from_array(np.full(size, value, value.dtype), f"{tensor}_float_{suffix}")
                    model.graph.initializer.append(repeated)
                    initializers[repeated.name] = repeated
                    inputs.append(repeated.name)
            copies[tensor] = f"{tensor}_float"
            inserts.append((position[dq.output[0]] + 1, helper.make_node(
                "DequantizeLinear", inputs, [copies[tensor]], name=f"{dq.name}_float", axis=axis)))
        node.input[i] = copies[tensor]
    for index, dq_copy in sorted(inserts, key=lambda x: -x[0]):
        model.graph.node.insert(index, dq_copy)
    replaced: set[str] = set()
    for _, dq_copy in inserts:
        quantize = producers.get(dq_copy.input[0])
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            replaced |= _shift_to_uint8(model, quantize, initializers)
    _drop_unused(model, replaced)
    return model


def _shift_to_uint8(model: onnx.ModelProto, quantize: onnx.NodeProto, initializers: dict[str, Any]) -> set[str]:
    """Make an int8 QuantizeLinear and the DequantizeLinears that read it uint8 (zero points + 128: the same
    values). ONNX Runtime does this itself on x64 for a Q with a single per-tensor DQ (QDQS8ToU8), and its
    S8S8 QLinearConv needs it; a pinned node's per-axis copy is a second DQ with a per-axis zero point, which
    would stop it and leave the producer's Conv in float with Q/DQ around it (measured on a built CNN).
    Returns the zero points it replaced."""
    if len(quantize.input) < 3 or quantize.input[2] not in initializers:
        return set()
    zero = numpy_helper.to_array(initializers[quantize.input[2]])
    readers = [n for n in model.graph.node if quantize.output[0] in n.input]
    if zero.dtype != np.int8 or any(n.op_type != "DequantizeLinear" or n.input[0] != quantize.output[0]
                                    or len(n.input) < 3 or n.input[2] not in initializers for n in readers):
        return set()
    replaced = set()
    for node in [quantize, *readers]:
        replaced.add(node.input[2])
        value = numpy_helper.to_array(initializers[node.input[2]])
        shifted = numpy_helper.from_array((value.astype(np.int16) + 128).astype(np.uint8), f"{node.input[2]}_u8")
        if shifted.name not in initializers:
            model.graph.initializer.append(shifted)
            initializers[shifted.name] = shifted
        node.input[2] = shifted.name
    for value_info in list(model.graph.value_info):
        if value_info.name == quantize.output[0]:
            model.graph.value_info.remove(value_info)
    return replaced


def _drop_unused(model: onnx.ModelProto, replaced: set[str]) -> None:
    """Remove DequantizeLinear nodes that nothing reads any more (subgraphs count), then their initializers and
    the `replaced` ones, when nothing else reads them."""
    def read() -> set[str]:
        return {name for n in _all_nodes(model.graph) for name in n.input} | {o.name for o in model.graph.output}

    names = read()
    dead = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and not any(o in names for o in n.output)]
    for node in dead:
        model.graph.node.remove(node)
    names = read()
    inputs = {name for node in dead for name in node.input} | replaced
    for tensor in [t for t in model.graph.initializer if t.name in inputs and t.name not in names]:
        model.graph.initializer.remove(tensor)


def _quantize_around_crashes(source: Path, target: Path, cache: Path, config: Int8StaticConfig,
                             op_types: list[str], excluded: list[str], known: list[str], feed: Feed,
                             preprocessed: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """quantize_static, leaving in float the nodes on which ORT's quantizer fails; returns them too.

    A tool failure on one node (Magika: a Gemm bias that is not 1-D makes quantize_static raise;
    elsewhere it writes a model that does not load) should cost that node, not the candidate. The
    error rarely names the node, so after trying any node the message names, a binary search over
    the quantizable nodes in graph order finds the first node whose quantization breaks the build
    (quantize the first k, keep the rest in float), up to MAX_TOOL_EXCLUSIONS nodes. `known` holds
    the nodes found by earlier builds of the same configuration and is extended in place.
    """
    def attempt(extra: Sequence[str]) -> tuple[onnx.ModelProto | None, str | None]:
        try:
            return _quantize(source, target, cache, config, op_types, [*excluded, *known, *extra], feed), None
        except Exception as exc:  # noqa: BLE001 - the tools raise anything
            return None, first_line(exc)

    model, error = attempt(())
    if model is not None:
        return model, []
    first_error = error
    scope = set(op_types)
    skip = set(excluded)
    found: list[str] = []
    while len(found) < MAX_TOOL_EXCLUSIONS:
        candidates = [n.name for n in preprocessed.graph.node
                      if n.op_type in scope and n.name and n.name not in skip and n.name not in known]
        named = [n for n in candidates if len(n) >= 4 and n in (error or "")]
        culprit = None
        if named:
            model, error = attempt(named[:1])
            culprit = named[0] if model is not None else None
        if culprit is None:
            if attempt(candidates)[0] is None:
                break  # not a node's fault: even with every candidate in float it fails
            lo, hi = 0, len(candidates)  # quantizing the first lo works, the first hi fails
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if attempt(candidates[mid:])[0] is not None:
                    lo = mid
                else:
                    hi = mid
            culprit = candidates[hi - 1]
        known.append(culprit)
        found.append(culprit)
        model, error = attempt(())
        if model is not None:
            return model, found
    raise PassError(f"{PASS_NAME}: {config.method} calibration or quantize_static failed: {first_error}"
                    + (f" (still failing with {found} in float)" if found else ""))


def run(model: onnx.ModelProto, config: Int8StaticConfig, calibration_feeds: Sequence[Feed],
        feed: Feed, shared: SharedCalibration | None = None) -> PassResult:
    """Quantize weights and activations, with activation ranges calibrated on `calibration_feeds`.

    With `shared`, the pre-processed model and the ranges come from (and go to) that cache; without
    it, this build calibrates its own scope.
    """
    _check_config(config)
    if not calibration_feeds:
        raise CalibrationError(
            "static INT8 needs calibration samples and none were given: upload a .npz with real inputs, or use "
            "dynamic INT8 (no samples needed)"
        )
    notes: list[str] = []
    # quantize_static's own default: every op type either quantizer knows.
    op_types = list(config.op_types) if config.op_types else sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    source_key = (shared.key(model), config.per_channel) if shared else None
    samples_key = shared.samples_key(calibration_feeds) if shared else None
    changes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="onnxforge-int8s-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        # (the calibrators print progress to stdout, which would corrupt the command line's JSON output)
        workdir = Path(tmp)
        def prepare() -> _Prepared:
            return _prepare(model, config.per_channel, workdir, calibration_feeds[0],
                            shared.preprocessed if shared is not None else None)

        prepared = shared.prepared(source_key, prepare) if shared is not None else prepare()
        source = workdir / "preprocessed.onnx"
        source.write_bytes(prepared.model_bytes)
        notes += prepared.notes
        preprocessed = onnx.load_model(source)
        excluded, exclude_notes = map_node_names(config.nodes_to_exclude, preprocessed)
        notes += exclude_notes
        per_sample, unknown = prepared.per_sample, prepared.unknown
        if unknown:
            notes.append(f"{unknown} float tensors have no inferred shape: the memory estimate leaves them out")
        chunk = calibration_chunk(len(calibration_feeds), per_sample, config.memory_budget_bytes,
                                  histogram=config.method != "minmax")
        target = workdir / "quantized.onnx"
        try:
            if shared is None:
                if chunk < len(calibration_feeds):
                    notes.append(f"calibrated in chunks of {chunk} samples to hold at most ~"
                                 f"{chunk * per_sample / 1024**2:.0f} MB of activations at once")
                cache = _calibrate(source, workdir, config, calibration_feeds, chunk, op_types)
            else:
                def make() -> _Ranges:
                    started = time.perf_counter()
                    data = _collect(source, workdir, config, calibration_feeds, chunk, None)
                    shared.calibrations.append({"method": config.method, "tensors": len(data.data),
                                                "seconds": round(time.perf_counter() - started, 3)})
                    return _Ranges(data, _tensors_by_op(source))

                options = tuple(sorted(_calibrator_options(config).items()))
                ranges, reused = shared.ranges((*source_key, samples_key, config.method, options), make)
                notes.append(f"{config.method} ranges " + ("reused from this search's shared calibration" if reused
                             else "calibrated once over every float tensor, shared with later builds"))
                changes["calibration_shared"] = reused
                cache = workdir / "calibration.json"
                save_tensors_data(ranges.scoped(op_types), cache)
        except Exception as exc:  # noqa: BLE001 - the tools raise anything ("Too many bins for data range", ...)
            raise PassError(f"{PASS_NAME}: {config.method} calibration or quantize_static failed: "
                            f"{first_line(exc)}") from None
        known = (shared.tool_excluded((*source_key, config.quant_format, config.activation_type, config.weight_type,
                                       tuple(op_types))) if shared is not None else [])
        known_before = list(known)
        quantized, found = _quantize_around_crashes(source, target, cache, config, op_types, excluded, known,
                                                    feed, preprocessed)
        tool_excluded = [*known_before, *found]
        if tool_excluded:
            notes.append(f"ONNX Runtime's quantizer failed on {tool_excluded}: left in float, the rest quantized")
    counts = require_quantized(quantized, model, PASS_NAME)
    changes.update({
        "quantized_ops": counts,
        "method": config.method,
        "quant_format": config.quant_format,
        "activation_type": config.activation_type,
        "weight_type": config.weight_type,
        "per_channel": config.per_channel,
        "reduce_range": config.reduce_range,
        "calibration_samples": len(calibration_feeds),
        "calibration_chunk": chunk,
        "activation_bytes_per_sample": per_sample,
        "tool_excluded_nodes": tool_excluded,
        "nodes_before": len(model.graph.node),
        "nodes_after": len(quantized.graph.node),
        "op_histogram_after": op_histogram(quantized),
    })
    return PassResult(quantized, changes, notes)

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
inference) whatever the method: the calibrators merge ranges and histograms across calls.
Also from real models: per-channel weights need opset >= 13 (DequantizeLinear `axis`) or the tool
writes an invalid file without warning, so older models are converted first; a result with no
quantized op, a tool exception or a model that does not run is a PassError.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, version_converter
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

from optimizer.errors import CalibrationError, PassError, first_line
from optimizer.passes.base import PassResult, verify_runs
from optimizer.passes.int8_dynamic import map_node_names, op_histogram, pre_process, require_quantized

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


def _calibrate(source: Path, workdir: Path, config: Int8StaticConfig, feeds: Sequence[Feed], chunk: int,
               op_types: list[str]) -> Path:
    """Collect activation ranges chunk by chunk and write them as a quantize_static calibration cache."""
    options = {name: config.extra_options[key] for key, name in _CALIBRATOR_OPTIONS.items()
               if key in config.extra_options}
    if config.method == "entropy":
        options.setdefault("num_bins", ENTROPY_BINS)
        options.setdefault("num_quantized_bins", ENTROPY_QUANTIZED_BINS)
    calibrator = create_calibrator(
        source,
        op_types,
        augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=_METHODS[config.method],
        extra_options=options,
    )
    for start in range(0, len(feeds), chunk):
        calibrator.collect_data(_FeedReader(feeds[start : start + chunk]))
    cache = workdir / "calibration.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def run(model: onnx.ModelProto, config: Int8StaticConfig, calibration_feeds: Sequence[Feed],
        feed: Feed) -> PassResult:
    """Quantize weights and activations, with activation ranges calibrated on `calibration_feeds`."""
    _check_config(config)
    if not calibration_feeds:
        raise CalibrationError(
            "static INT8 needs calibration samples and none were given: upload a .npz with real inputs, or use "
            "dynamic INT8 (no samples needed)"
        )
    notes: list[str] = []
    source_model = _to_per_channel_opset(model, notes) if config.per_channel else model
    # quantize_static's own default: every op type either quantizer knows.
    op_types = list(config.op_types) if config.op_types else sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    with tempfile.TemporaryDirectory(prefix="onnxforge-int8s-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        # (the calibrators print progress to stdout, which would corrupt the command line's JSON output)
        workdir = Path(tmp)
        source, pre_notes = pre_process(source_model, workdir, PASS_NAME)
        notes += pre_notes
        preprocessed = onnx.load_model(source)
        excluded, exclude_notes = map_node_names(config.nodes_to_exclude, preprocessed)
        notes += exclude_notes
        per_sample, unknown = activation_bytes_per_sample(preprocessed, calibration_feeds[0])
        if unknown:
            notes.append(f"{unknown} float tensors have no inferred shape: the memory estimate leaves them out")
        chunk = calibration_chunk(len(calibration_feeds), per_sample, config.memory_budget_bytes,
                                  histogram=config.method != "minmax")
        if chunk < len(calibration_feeds):
            notes.append(f"calibrated in chunks of {chunk} samples to hold at most ~"
                         f"{chunk * per_sample / 1024**2:.0f} MB of activations at once")
        target = workdir / "quantized.onnx"
        try:
            cache = _calibrate(source, workdir, config, calibration_feeds, chunk, op_types)
            quantize_static(
                source,
                target,
                calibration_data_reader=None,
                calibration_cache_path=cache,
                quant_format=_FORMATS[config.quant_format],
                op_types_to_quantize=op_types,
                per_channel=config.per_channel,
                activation_type=_TYPES[config.activation_type],
                weight_type=_TYPES[config.weight_type],
                nodes_to_exclude=excluded,
                calibrate_method=_METHODS[config.method],
                extra_options=dict(config.extra_options),
            )
            quantized = onnx.load_model(target)
        except Exception as exc:  # noqa: BLE001 - the tools raise anything ("Too many bins for data range", ...)
            raise PassError(f"{PASS_NAME}: {config.method} calibration or quantize_static failed: "
                            f"{first_line(exc)}") from None
    counts = require_quantized(quantized, model, PASS_NAME)
    verify_runs(quantized, feed, PASS_NAME)
    changes = {
        "quantized_ops": counts,
        "method": config.method,
        "quant_format": config.quant_format,
        "activation_type": config.activation_type,
        "weight_type": config.weight_type,
        "per_channel": config.per_channel,
        "calibration_samples": len(calibration_feeds),
        "calibration_chunk": chunk,
        "activation_bytes_per_sample": per_sample,
        "nodes_before": len(model.graph.node),
        "nodes_after": len(quantized.graph.node),
        "op_histogram_after": op_histogram(quantized),
    }
    return PassResult(quantized, changes, notes)

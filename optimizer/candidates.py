"""Which variants to build for a request: one recipe for an explicit precision, a short list for auto.

A candidate is a name, a precision, JSON-ready settings for the report and a `build` function
from (fused fp32 model, sample set) to a PassResult. Candidates never decide which one wins:
the pipeline measures them all the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx

from optimizer.calibration import SampleSet
from optimizer.passes import fp16, int8_dynamic, int8_static
from optimizer.passes.base import PassResult

Build = Callable[[onnx.ModelProto, SampleSet], PassResult]

#: The op types whose integer kernels pay; quantizing only these keeps softmax, mask adds and outputs in float.
HEAVY_OPS = ("Conv", "MatMul", "Gemm")


@dataclass
class Candidate:
    name: str
    precision: str  # fp32 | fp16 | int8
    settings: dict[str, Any]
    build: Build


@dataclass
class Plan:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {name, reason}: not tried, and why


def fp16_candidate(provider: str) -> Candidate:
    config = fp16.Fp16Config(provider=provider)
    return Candidate("fp16", "fp16", {"keep_io_types": True, "provider": provider},
                     lambda m, s: fp16.run(m, config, s.holdout[0]))


def dynamic_candidate(weight_type: str = "int8", per_channel: bool = True) -> Candidate:
    config = int8_dynamic.Int8DynamicConfig(weight_type=weight_type, per_channel=per_channel)
    suffix = "s8" if weight_type == "int8" else "u8"
    return Candidate(f"int8-dynamic-{suffix}{'-pc' if per_channel else ''}", "int8",
                     {"mode": "dynamic", "weight_type": weight_type, "per_channel": per_channel},
                     lambda m, s: int8_dynamic.run(m, config, s.holdout[0]))


def static_candidate(method: str = "minmax", quant_format: str = "qdq", activation_type: str = "int8",
                     op_types: tuple[str, ...] | None = None) -> Candidate:
    config = int8_static.Int8StaticConfig(method=method, quant_format=quant_format, activation_type=activation_type,
                                          op_types=op_types)
    act = "s8" if activation_type == "int8" else "u8"
    scope = "heavy" if op_types else "all"
    return Candidate(f"int8-static-{method}-{quant_format}-{act}s8-{scope}", "int8",
                     {"mode": "static", "method": method, "format": quant_format,
                      "activation_type": activation_type, "weight_type": "int8", "per_channel": True,
                      "op_types": list(op_types) if op_types else "all"},
                     lambda m, s: int8_static.run(m, config, s.calibration, s.holdout[0]))


def plan(precision: str, *, provider: str, int8_mode: str | None, method: str, has_calibration: bool) -> Plan:
    """The candidates for a request. `int8_mode` is already resolved when precision is int8."""
    result = Plan()
    if precision == "fp32":
        return result
    if precision == "fp16":
        result.candidates.append(fp16_candidate(provider))
    elif precision == "int8":
        if int8_mode == "dynamic":
            result.candidates.append(dynamic_candidate())
        else:
            result.candidates.append(static_candidate(method))
    else:  # auto
        result = auto_plan(provider=provider, method=method, has_calibration=has_calibration)
    return result


def auto_plan(*, provider: str, method: str, has_calibration: bool) -> Plan:
    """A short, measured list: what tends to pay on this provider, each checked and timed by the pipeline."""
    result = Plan()
    if provider == "cuda":
        result.candidates.append(fp16_candidate(provider))
        result.skipped.append({"name": "int8", "reason": "ONNX Runtime's CUDA provider runs INT8 QDQ/QLinear "
                               "ops without acceleration (they fall back to CPU kernels); FP16 is the GPU win"})
        return result
    result.candidates.append(dynamic_candidate("int8", per_channel=True))
    if has_calibration:
        result.candidates.append(static_candidate(method, activation_type="uint8", op_types=HEAVY_OPS))
        result.candidates.append(static_candidate(method, activation_type="uint8"))
    else:
        result.skipped.append({"name": "int8-static", "reason": "no calibration set was given"})
    result.skipped.append({"name": "fp16", "reason": "FP16 on most CPUs runs through Cast nodes around ops "
                           "without FP16 kernels and is not faster; it is tried on CUDA"})
    return result

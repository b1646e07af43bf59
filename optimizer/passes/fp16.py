"""FP16: float32 weights and compute to float16, inputs and outputs kept float32.

FP16 is the GPU win; on most CPUs it is no faster (Cast nodes around ops without FP16 kernels), so
the pipeline times it like any other variant. Calls ONNX Runtime's own converter
(`onnxruntime.transformers.float16`) through `OnnxModel.convert_float_to_float16`, which types contrib ops
(Attention, SkipLayerNormalization from the fusion pass) with symbolic shape inference and removes
redundant Casts; onnxconverter_common has the same converter and is not installed.
Inputs and outputs stay float32 so clients change nothing; ops known to break in FP16 stay float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnxruntime.transformers import float16
from onnxruntime.transformers.onnx_model import OnnxModel

from optimizer.errors import PassError, first_line
from optimizer.passes.base import PassResult, verify_runs

PASS_NAME = "fp16"
FP16_MAX = 65504.0

# ORT's list (traditional-ML ops, NonMaxSuppression, TopK, RoiAlign, Range, CumSum, Min, Max, Upsample)
# plus what is known to break on top of it:
EXTRA_BLOCKED_OPS = (
    "Resize",  # coordinate/scale arithmetic loses precision; onnxconverter_common blocks it too
    "Pow",  # x**2 of an unfused LayerNorm variance overflows float16 once |x| > 256
    # Random generators carry a float `dtype` attribute the converter leaves alone: type mismatches.
    "RandomNormal", "RandomNormalLike", "RandomUniform", "Multinomial", "Bernoulli",
)
DEFAULT_BLOCK_LIST: tuple[str, ...] = tuple(float16.DEFAULT_OP_BLOCK_LIST) + EXTRA_BLOCKED_OPS


@dataclass(frozen=True)
class Fp16Config:
    keep_io_types: bool = True
    op_block_list: Sequence[str] = DEFAULT_BLOCK_LIST
    node_block_list: Sequence[str] = ()
    provider: str = "cpu"  # recorded only: the converted file is the same for every provider


def _io_types(model: onnx.ModelProto) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


def _out_of_range_weights(model: onnx.ModelProto) -> int:
    """Float32 initializers holding values float16 cannot represent (the converter clamps them)."""
    count = 0
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor)
            if array.size and float(np.max(np.abs(array))) > FP16_MAX:
                count += 1
    return count


def run(model: onnx.ModelProto, config: Fp16Config, feed: dict) -> PassResult:
    """Convert to float16; PassError if the converter raises, changes IO types or writes a model that fails."""
    source = onnx.ModelProto()
    source.CopyFrom(model)  # the converter edits its argument in place
    try:
        wrapper = OnnxModel(source)
        wrapper.convert_float_to_float16(
            keep_io_types=config.keep_io_types,
            op_block_list=list(config.op_block_list),
            node_block_list=list(config.node_block_list),
        )
        # The converter appends the float32 IO Casts at the end of the node list; the checker wants order.
        wrapper.topological_sort()
        converted = wrapper.model
    except Exception as exc:  # noqa: BLE001 - the converter raises anything
        raise PassError(f"{PASS_NAME}: the float16 converter failed: {first_line(exc)}") from None

    if config.keep_io_types:
        before, after = _io_types(model), _io_types(converted)
        changed = [name for name, elem in before.items() if after.get(name) != elem]
        if changed:
            raise PassError(f"{PASS_NAME}: the converter changed the type of inputs/outputs {changed} although "
                            "keep_io_types was set")

    fp16_weights = sum(t.data_type == TensorProto.FLOAT16 for t in converted.graph.initializer)
    if fp16_weights == 0 and not any(n.op_type == "Cast" for n in converted.graph.node):
        raise PassError(f"{PASS_NAME} converted nothing: the model has no float32 tensors outside blocked ops")
    verify_runs(converted, feed, PASS_NAME)

    notes = []
    clamped = _out_of_range_weights(model)
    if clamped:
        notes.append(f"{clamped} weight tensors hold values beyond float16's range (±{FP16_MAX:g}) and were clamped")
    blocked = sorted({n.op_type for n in model.graph.node if n.op_type in set(config.op_block_list)})
    if blocked:
        notes.append(f"kept in float32 (block list): {', '.join(blocked)}")
    casts_before = sum(n.op_type == "Cast" for n in model.graph.node)
    changes = {
        "float16_initializers": fp16_weights,
        "casts_added": sum(n.op_type == "Cast" for n in converted.graph.node) - casts_before,
        "blocked_nodes": sum(n.op_type in set(config.op_block_list) for n in model.graph.node),
        "nodes_before": len(model.graph.node),
        "nodes_after": len(converted.graph.node),
        "keep_io_types": config.keep_io_types,
        "provider": config.provider,
    }
    return PassResult(converted, changes, notes)

"""Specialize a model for input values its user fixes: each named input becomes a constant and leaves the interface.

Why: some models keep their compute inside `If` branches chosen by an input (Silero VAD picks its 8 kHz or
16 kHz network from `sr`). The quantizer does not see into branches, and inlining a branch is only correct
when the condition cannot change. A user who serves one sample rate can say so: the input is replaced by
its value, after which ONNX Runtime's constant folding (the cleanup pass) folds the condition and inlines
the taken branch.

This is never done implicitly, and the input is *removed*, not kept and ignored: a client that still sends
it gets a clear "unknown input" error instead of silently wrong results for another value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from optimizer.errors import PassError
from optimizer.passes.base import PassResult

PASS_NAME = "specialize"


def _graph_inputs(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return {v.name: v for v in model.graph.input if v.name not in initializers}


def _as_input_tensor(value: Any, spec: onnx.ValueInfoProto) -> np.ndarray:
    """`value` in the input's element type and declared shape; PassError when it cannot be."""
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type))
    array = np.asarray(value)
    if array.dtype.kind != dtype.kind and not (array.dtype.kind in "iu" and dtype.kind in "iuf"):
        raise PassError(f"{PASS_NAME}: input {spec.name!r} is {dtype.name}; the value {value!r} is {array.dtype.name}")
    cast = array.astype(dtype)
    if not np.array_equal(cast, array):
        raise PassError(f"{PASS_NAME}: the value {value!r} does not fit input {spec.name!r} ({dtype.name})")
    dims = list(spec.type.tensor_type.shape.dim)
    if spec.type.tensor_type.HasField("shape"):
        shape_ok = len(dims) == cast.ndim and all(not d.HasField("dim_value") or d.dim_value <= 0 or d.dim_value == n
                                                  for d, n in zip(dims, cast.shape, strict=True))
        if not shape_ok:
            declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise PassError(f"{PASS_NAME}: input {spec.name!r} has shape {declared}; the value has shape "
                            f"{list(cast.shape)}")
    return cast


def run(model: onnx.ModelProto, values: Mapping[str, Any]) -> PassResult:
    """A copy of `model` with each input in `values` replaced by that constant and removed from its inputs.

    Fold and inline with the cleanup pass afterwards. Raises PassError for an unknown input, a value that does
    not fit it, or an attempt to fix every input.
    """
    if not values:
        raise PassError(f"{PASS_NAME}: no inputs to fix were given")
    inputs = _graph_inputs(model)
    unknown = sorted(set(values) - set(inputs))
    if unknown:
        raise PassError(f"{PASS_NAME}: the model has no input named {', '.join(map(repr, unknown))}; "
                        f"its inputs are {', '.join(map(repr, inputs))}")
    if set(values) == set(inputs):
        raise PassError(f"{PASS_NAME}: fixing every input leaves a model with no inputs; keep at least one")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    fixed = {name: _as_input_tensor(value, inputs[name]) for name, value in values.items()}
    kept = [v for v in result.graph.input if v.name not in fixed]
    del result.graph.input[:]
    result.graph.input.extend(kept)
    # An initializer under the same name: every reference, in subgraphs too, now reads the constant.
    result.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in fixed.items())
    try:
        onnx.checker.check_model(result)
    except onnx.checker.ValidationError as exc:
        raise PassError(f"{PASS_NAME} wrote an invalid model: {exc}") from None
    changes = {"fixed_inputs": {name: array.tolist() for name, array in fixed.items()},
               "inputs_left": [v.name for v in kept]}
    notes = [f"input {name!r} fixed to {array.tolist()} and removed from the model's inputs"
             for name, array in fixed.items()]
    return PassResult(model=result, changes=changes, notes=notes)

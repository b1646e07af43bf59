"""The memory an upload's validation may take, so that a model whose load computes a huge constant is refused at
upload instead of taking a replica's memory at its first predict (security review finding 3).

WHY: ONNX Runtime folds constants when it creates a session at the serving level ("all"): a 201-byte model
(ConstantOfShape([2^30]) -> ReduceSum) made the API process allocate ~9 GiB at its first predict, and the shared run
arena (optimizer.runtime.shared_arena) does not cover folding. Validation now makes its session at the serving level
in its child process (app/services/validation_child.py), under an address-space limit (RLIMIT_AS) of `budget_mb`
more than the child had at its fork. Two ways a fold past it shows (ORT 1.32, notes/fold_guard/probe.py):
- a constant that fits but whose copy does not: the session fails with std::bad_alloc (optimizer.loading's
  LoadMemoryError), cleanly, in the child;
- a constant larger than what is left: ORT skips folding that node with a warning only, and the session loads. The
  serving process, which has no such limit, would then fold it. `refuse_large_constants` catches these from the
  shapes inference gives the tensors computed from constants alone.
"""

from __future__ import annotations

import math
import resource
from pathlib import Path

import onnx

from app.settings import MiB
from optimizer.loading import LoadMemoryError

#: What a validation may add to its child's address space, besides LOAD_MEMORY_PER_FILE_BYTE x the model file.
#: WHY 4096 MiB: the service's default session memory budget (ONNXFORGE_SESSION_CACHE_MAX_MB), so a model whose load
#: alone needs more than all served sessions may hold is refused. Ordinary models stay far below (measured in
#: notes/fold_guard: the test cnn/mlp/transformer/lstm and a 200 MB MatMul chain). Wanted as a setting
#: (app/settings.py is not this module's to change).
LOAD_MEMORY_MB = 4096
#: A model's own size counts several times over while it is checked (protobuf, checker, ORT's copy and prepacked
#: weights, shape inference): peak RSS ~2-3x the file (bench/loading_memory.py); address space more.
LOAD_MEMORY_PER_FILE_BYTE = 4
#: ORT holds a folded constant twice at once (the computed tensor and the initializer made from it): a 1 GiB
#: ConstantOfShape peaked at 2.1 GiB RSS (notes/memguard).
_FOLD_COPIES = 2
#: Initializers at most this large go into the data propagation copy (`_propagated_types`).
_SMALL_BYTES = 1 << 20
#: Ops ONNX Runtime never folds (their values change per run): computed at run time, where the run arena caps them.
_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def budget_mb(model_path: Path) -> int:
    """The address space (MiB) the validation of the model at `model_path` may add."""
    return LOAD_MEMORY_MB + math.ceil(LOAD_MEMORY_PER_FILE_BYTE * model_path.stat().st_size / MiB)


def _vm_size_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) // 1024
    return 0


def limit_address_space(extra_mb: int) -> None:
    """Cap this process's address space at what it has now plus `extra_mb` (for the validation child only: the cap
    stays until the process ends)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = (_vm_size_mb() + extra_mb) * MiB
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft == resource.RLIM_INFINITY or limit < soft:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def too_large(extra_mb: int, what: str = "") -> LoadMemoryError:
    """The upload's answer (400) when loading the model needs more than `extra_mb` MiB."""
    return LoadMemoryError(
        f"loading this model needs more than {extra_mb:,} MiB: a constant the graph computes at load time is too "
        f"large{what}. ONNX Runtime computes such constants (e.g. ConstantOfShape or Expand of a constant shape) when "
        "it loads the model; compute it from the inputs at run time or make it smaller")


def _static_bytes(value_type: onnx.TypeProto | None) -> int | None:
    if value_type is None or not value_type.HasField("tensor_type"):
        return None
    tensor = value_type.tensor_type
    if not tensor.HasField("shape") or tensor.elem_type == onnx.TensorProto.STRING:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if any(d < 0 for d in dims):
        return None
    return math.prod(dims) * onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize


def _propagated_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The tensors' types from shape inference with data propagation, which also knows shapes computed from constants
    (ConstantOfShape of a Concat of constants: without it such a 1 GiB constant passed a 256 MiB limit unseen). Run on
    a copy whose initializers over _SMALL_BYTES are inputs of their type: shape tensors are small, weights need not
    be copied. {} when it fails (the plain inference's types are used)."""
    graph = model.graph
    light = onnx.GraphProto(name=graph.name)
    light.node.extend(graph.node)
    light.input.extend(graph.input)
    light.output.extend(graph.output)
    inputs = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if tensor.ByteSize() <= _SMALL_BYTES:
            light.initializer.append(tensor)
        elif tensor.name not in inputs:
            light.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    copy = onnx.helper.make_model(light, opset_imports=model.opset_import, ir_version=model.ir_version)
    copy.functions.extend(model.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(copy, data_prop=True).graph
    except Exception:  # noqa: BLE001 - a model the plain inference took: its types are the fallback
        return {}
    return {v.name: v.type for v in [*inferred.value_info, *inferred.output]}


def largest_folded_constant(model: onnx.ModelProto) -> tuple[str, int] | None:
    """(name, bytes) of the largest tensor of the main graph computed from constants alone whose shape inference
    knows (what ONNX Runtime folds at load), None if there is none. Needs the model's inferred value_info."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    constant = {t.name for t in graph.initializer if t.name not in inputs} | {""}  # "": an optional input left out
    types = {v.name: v.type for v in [*graph.value_info, *graph.output]}
    propagated = _propagated_types(model)
    largest: tuple[str, int] | None = None
    for node in graph.node:  # in topological order (the checker requires it)
        if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED:
            continue
        if not all(name in constant for name in node.input):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        constant.update(node.output)
        for name in node.output:
            size = _static_bytes(propagated.get(name))
            if size is None:
                size = _static_bytes(types.get(name))
            if size is not None and (largest is None or size > largest[1]):
                largest = (name, size)
    return largest


def refuse_large_constants(model: onnx.ModelProto, extra_mb: int) -> None:
    """LoadMemoryError when folding the model's largest constant would need more than `extra_mb` MiB."""
    largest = largest_folded_constant(model)
    if largest is not None and largest[1] * _FOLD_COPIES > extra_mb * MiB:
        name, size = largest
        raise too_large(extra_mb, f" ({name!r}: {size / MiB:,.0f} MiB)")

"""1-D convolutions rewritten as im2col + MatMul, so dynamic INT8 runs them on ONNX Runtime's fast integer GEMM.

Why: on Magika (one Conv 256->512 channels, kernel 5x1 over 512 positions, 90% of its FP32 time) static INT8
flips 6-7 of 268 held-back top-1 decisions whatever the ranges (MinMax, MSE-optimal clipping, SmoothQuant-style
channel scales: bench/int8_levers.py): fake-quantizing one piece at a time in float showed the weights harmless
(0 flips) and the per-tensor static range of the Conv's input (4-5 flips) and output (3 flips) to blame; the
input's range per run is far smaller than over the calibration set. Dynamic INT8 (a range per run, float
output) keeps every decision (0/268), but ONNX Runtime's ConvInteger runs it at 0.25-0.7x FP32. The same Conv
as a MatMul gets ONNX Runtime's dynamic MatMul kernels (DynamicQuantizeLinear + MatMulInteger, U8S8 GEMM with
VNNI/AMX on x86): 1.3-1.6x FP32 at cosine 1.0000 and 2 top-1 flips in 800.

A Conv qualifies when its weight is a constant [O, C, k] or [O, C, k, 1] with group 1, stride 1, dilation 1,
no padding, and (4-D) its input's last axis is known to be 1; not when its input is known to have one position
(text orientation's squeeze-excitation 1x1 Convs on pooled [N, C, 1, 1]: no GEMM to speed up).
Then Y = Conv(X, W, B) becomes
    Xt = Transpose(X) -> [N, L, C] (Squeeze of the unit axis for 4-D)
    cols = Concat(Slice(Xt, i, L - k + 1 + i) for i < k, axis 2) -> [N, L - k + 1, k*C]
    Y = Transpose(MatMul(cols, Wm) + B) (Unsqueeze for 4-D), Wm[i*C + c, o] = W[o, c, i]
which is the same function (FP32 outputs equal up to summation order). The MatMul is named "<conv name>/mm", so
a repair that names the Conv still finds it (int8_dynamic.map_node_names matches "<name>/" prefixes). The Slices
and Concat copy the input k times: worth it only where the Conv dominates, which the pipeline's timing decides,
as for every candidate.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from optimizer.passes.base import PassResult, verify_runs

PASS_NAME = "conv_matmul"
Feed = dict[str, np.ndarray]
_END = np.iinfo(np.int64).max


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def _attr_s(node: onnx.NodeProto, name: str, default: str) -> str:
    return next((a.s.decode() for a in node.attribute if a.name == name), default)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Inferred dims (0 where unknown) of every tensor shape inference reaches."""
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}


def qualifying(model: onnx.ModelProto) -> list[str]:
    """Names (or outputs, for unnamed nodes) of the Convs this pass rewrites (see the module docstring)."""
    inits = {t.name: t for t in model.graph.initializer}
    shapes: dict[str, list[int]] | None = None
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = list(inits[node.input[1]].dims)
        rank = len(dims)
        if rank not in (3, 4) or (rank == 4 and dims[3] != 1):
            continue
        if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
            continue
        if any(v != 1 for v in (_ints(node, "strides") or []) + (_ints(node, "dilations") or [])):
            continue
        if any(v != 0 for v in _ints(node, "pads") or []) or _attr_s(node, "auto_pad", "NOTSET") not in (
                "NOTSET", "VALID"):
            continue
        if next((a.i for a in node.attribute if a.name == "group"), 1) != 1:
            continue
        shapes = _shapes(model) if shapes is None else shapes
        x = shapes.get(node.input[0])
        if rank == 4 and (not x or len(x) != 4 or x[3] != 1):
            continue
        if x and len(x) == rank and x[2] == 1:
            continue  # one position (a squeeze-excitation FC): nothing for a GEMM to gain
        found.append(node.name or node.output[0])
    return found


def rewrite(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` with every qualifying Conv as im2col + MatMul; returns it and the Convs rewritten."""
    wanted = set(qualifying(model))
    result = onnx.ModelProto()
    result.CopyFrom(model)
    if not wanted:
        return result, []
    graph = result.graph
    inits = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    done = []
    for node in graph.node:
        key = node.name or node.output[0]
        if node.op_type != "Conv" or key not in wanted:
            nodes.append(node)
            continue
        done.append(key)
        prefix = f"{key}/mm"  # "<conv>/...": map_node_names finds it by the Conv's name
        weight = numpy_helper.to_array(inits[node.input[1]])
        four_d = weight.ndim == 4
        out_ch, in_ch, k = weight.shape[:3]
        matrix = weight.reshape(out_ch, in_ch, k).transpose(2, 1, 0).reshape(k * in_ch, out_ch)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(matrix, np.float32), f"{prefix}_w"))

        def const(name: str, values: list[int], prefix: str = prefix) -> str:
            graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), f"{prefix}_{name}"))
            return f"{prefix}_{name}"

        x = node.input[0]
        if four_d:
            nodes.append(helper.make_node("Squeeze", [x, const("unit_axis", [3])], [f"{prefix}_ncl"]))
            x = f"{prefix}_ncl"
        nodes.append(helper.make_node("Transpose", [x], [f"{prefix}_nlc"], perm=[0, 2, 1]))
        columns = f"{prefix}_nlc"
        if k > 1:
            pieces = []
            for i in range(k):
                end = i - (k - 1) if i < k - 1 else _END
                pieces.append(f"{prefix}_col{i}")
                nodes.append(helper.make_node("Slice", [f"{prefix}_nlc", const(f"start{i}", [i]),
                                                        const(f"end{i}", [end]), const(f"axis{i}", [1])],
                                              [pieces[-1]]))
            nodes.append(helper.make_node("Concat", pieces, [f"{prefix}_cols"], axis=2))
            columns = f"{prefix}_cols"
        nodes.append(helper.make_node("MatMul", [columns, f"{prefix}_w"], [f"{prefix}_y"], name=prefix))
        y = f"{prefix}_y"
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [y, node.input[2]], [f"{prefix}_yb"], name=f"{prefix}_bias"))
            y = f"{prefix}_yb"
        if four_d:
            nodes.append(helper.make_node("Transpose", [y], [f"{prefix}_ncl_out"], perm=[0, 2, 1]))
            nodes.append(helper.make_node("Unsqueeze", [f"{prefix}_ncl_out", const("unit_axis_out", [3])],
                                          [node.output[0]]))
        else:
            nodes.append(helper.make_node("Transpose", [y], [node.output[0]], perm=[0, 2, 1]))
    used = {name for n in nodes for name in n.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    del graph.node[:]
    graph.node.extend(nodes)
    return result, done


def run(model: onnx.ModelProto, feed: Feed) -> PassResult:
    """Rewrite the qualifying Convs; checked to load and run on `feed`."""
    rewritten, done = rewrite(model)
    if done:
        verify_runs(rewritten, feed, PASS_NAME)
    notes = ([f"{len(done)} 1-D Conv(s) rewritten as im2col + MatMul, so dynamic INT8 quantizes them as MatMuls"]
             if done else ["no Conv qualifies (constant weight, 1-D kernel, group 1, stride 1, no padding)"])
    return PassResult(rewritten, {"convs_as_matmul": done}, notes)

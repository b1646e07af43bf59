"""Small ONNX models built with onnx.helper, shared by the tests and the benchmarks.

Each builder returns an `onnx.ModelProto` with fixed, seeded weights, IR version 8 (so every
onnxruntime wheel loads it) and a dynamic batch axis named "batch".
"""

from __future__ import annotations

import io

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


class GraphBuilder:
    """Collects nodes and initializers with unique names, so builders read like the network."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, array: np.ndarray, prefix: str = "w") -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, *shape: int, scale: float | None = None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        scale = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        return self.const(self.rng.normal(0, scale, size=shape).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], n_outputs: int = 1, **attrs) -> str | list[str]:
        outputs = [self.name(op_type.lower()) for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.name(op_type), **attrs))
        return outputs[0] if n_outputs == 1 else outputs

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="onnxforge-tests")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        return model

    def rename_output(self, tensor: str, new_name: str) -> None:
        """Give the last node's output a stable public name (graph output)."""
        for node in reversed(self.nodes):
            for i, out in enumerate(node.output):
                if out == tensor:
                    node.output[i] = new_name
                    return
        raise KeyError(tensor)


def cnn(seed: int = 0, channels: tuple[int, ...] = (8, 16), image: int = 32, classes: int = 10) -> onnx.ModelProto:
    """Conv-BatchNorm-Relu blocks, global pooling and a Gemm classifier: input [batch,3,H,W] -> logits."""
    b = GraphBuilder(seed)
    x = "image"
    in_ch = 3
    for out_ch in channels:
        x = b.op("Conv", [x, b.weight(out_ch, in_ch, 3, 3), b.weight(out_ch, scale=0.1)], pads=[1, 1, 1, 1])
        gamma = b.const(b.rng.uniform(0.5, 1.5, out_ch).astype(np.float32))
        beta = b.const(b.rng.normal(0, 0.1, out_ch).astype(np.float32))
        mean = b.const(b.rng.normal(0, 0.1, out_ch).astype(np.float32))
        var = b.const(b.rng.uniform(0.5, 1.5, out_ch).astype(np.float32))
        x = b.op("BatchNormalization", [x, gamma, beta, mean, var], epsilon=1e-5)
        x = b.op("Relu", [x])
        in_ch = out_ch
    x = b.op("GlobalAveragePool", [x])
    x = b.op("Flatten", [x], axis=1)
    x = b.op("Gemm", [x, b.weight(classes, in_ch), b.weight(classes, scale=0.1)], transB=1)
    b.rename_output(x, "logits")
    return b.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        "cnn",
    )


def detector(seed: int = 0, channels: tuple[int, ...] = (8, 16), image: int = 16, outputs: int = 5,
             box_scale: float = 300.0, hidden_outlier: float = 1.0) -> onnx.ModelProto:
    """Conv-Relu blocks and a 1x1 Conv head whose channel 0 is a box coordinate (~box_scale) and the
    others are scores (~1), side by side in one output [batch, outputs, H, W], as detectors export it.

    One INT8 scale for that output rounds every score away: the model that breaks static INT8 in its
    last layer and is repaired by leaving the head Conv in float. `hidden_outlier` scales channel 0 of
    the first block's output (and divides the next Conv's weights for it, so the function is the
    same): an activation outlier in the middle of the network that breaks INT8 away from the head.
    """
    b = GraphBuilder(seed)
    x, in_ch = "image", 3
    for i, out_ch in enumerate(channels):
        w = b.rng.normal(0, 1.0 / np.sqrt(in_ch * 9), size=(out_ch, in_ch, 3, 3)).astype(np.float32)
        bias = b.rng.normal(0, 0.1, size=out_ch).astype(np.float32)
        if i == 0:
            w[0] *= hidden_outlier
            bias[0] *= hidden_outlier
        elif i == 1:
            w[:, 0] /= hidden_outlier
        x = b.op("Conv", [x, b.const(w), b.const(bias)], pads=[1, 1, 1, 1])
        x = b.op("Relu", [x])
        in_ch = out_ch
    head = b.rng.normal(0, 1.0 / np.sqrt(in_ch), size=(outputs, in_ch, 1, 1)).astype(np.float32)
    head[0] *= box_scale
    x = b.op("Conv", [x, b.const(head), b.weight(outputs, scale=0.1)])
    b.rename_output(x, "detections")
    return b.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["batch", outputs, image, image])],
        "detector",
    )


def mlp(seed: int = 0, features: int = 64, hidden: int = 128, classes: int = 10) -> onnx.ModelProto:
    """MatMul+Add+Relu layers: input [batch,features] -> logits [batch,classes]."""
    b = GraphBuilder(seed)
    x = b.op("MatMul", ["features", b.weight(features, hidden)])
    x = b.op("Add", [x, b.weight(hidden, scale=0.1)])
    x = b.op("Relu", [x])
    x = b.op("MatMul", [x, b.weight(hidden, hidden)])
    x = b.op("Add", [x, b.weight(hidden, scale=0.1)])
    x = b.op("Relu", [x])
    x = b.op("MatMul", [x, b.weight(hidden, classes)])
    x = b.op("Add", [x, b.weight(classes, scale=0.1)])
    b.rename_output(x, "logits")
    return b.model(
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        "mlp",
    )


def _layer_norm(b: GraphBuilder, x: str, hidden: int) -> str:
    """LayerNorm the way PyTorch exports it before opset 17 (the pattern fusers look for)."""
    mean = b.op("ReduceMean", [x], axes=[-1])
    centered = b.op("Sub", [x, mean])
    squared = b.op("Pow", [centered, b.const(np.array(2.0, np.float32))])
    var = b.op("ReduceMean", [squared], axes=[-1])
    std = b.op("Sqrt", [b.op("Add", [var, b.const(np.array(1e-5, np.float32))])])
    normed = b.op("Div", [centered, std])
    scaled = b.op("Mul", [normed, b.const(b.rng.uniform(0.8, 1.2, hidden).astype(np.float32))])
    return b.op("Add", [scaled, b.const(b.rng.normal(0, 0.05, hidden).astype(np.float32))])


def _gelu(b: GraphBuilder, x: str) -> str:
    """Gelu the way PyTorch exports it: x * 0.5 * (1 + erf(x / sqrt(2)))."""
    erf = b.op("Erf", [b.op("Div", [x, b.const(np.array(np.sqrt(2.0), np.float32))])])
    one_plus = b.op("Add", [erf, b.const(np.array(1.0, np.float32))])
    return b.op("Mul", [b.op("Mul", [x, one_plus]), b.const(np.array(0.5, np.float32))])


def _linear(b: GraphBuilder, x: str, n_in: int, n_out: int) -> str:
    return b.op("Add", [b.op("MatMul", [x, b.weight(n_in, n_out)]), b.weight(n_out, scale=0.02)])


def transformer(seed: int = 0, hidden: int = 64, heads: int = 4, layers: int = 1, ffn: int | None = None,
                vocab: int | None = None) -> onnx.ModelProto:
    """A BERT-style encoder (attention with mask, LayerNorm, Gelu) as PyTorch exports it.

    Inputs: `hidden_states` [batch,seq,hidden] float and `attention_mask` [batch,seq] int64.
    Output: `last_hidden_state` [batch,seq,hidden].
    """
    ffn = ffn or 4 * hidden
    head_dim = hidden // heads
    b = GraphBuilder(seed)
    # Additive mask as BERT exports it: (1 - mask) * -10000, broadcast over heads and query positions.
    # Two single-axis Unsqueezes (mask[:, None, None, :] in PyTorch): ONNX Runtime's attention fusion
    # matches exactly this path, and does not fuse Attention after one Unsqueeze with axes [1, 2].
    mask = b.op("Unsqueeze", ["attention_mask", b.const(np.array([1], np.int64))])
    mask = b.op("Unsqueeze", [mask, b.const(np.array([2], np.int64))])
    mask = b.op("Cast", [mask], to=TensorProto.FLOAT)
    mask = b.op("Sub", [b.const(np.array(1.0, np.float32)), mask])
    mask = b.op("Mul", [mask, b.const(np.array(-10000.0, np.float32))])

    x = "hidden_states"
    split_shape = b.const(np.array([0, 0, heads, head_dim], np.int64))
    merge_shape = b.const(np.array([0, 0, hidden], np.int64))
    for _ in range(layers):
        q = b.op("Transpose", [b.op("Reshape", [_linear(b, x, hidden, hidden), split_shape])], perm=[0, 2, 1, 3])
        k = b.op("Transpose", [b.op("Reshape", [_linear(b, x, hidden, hidden), split_shape])], perm=[0, 2, 3, 1])
        v = b.op("Transpose", [b.op("Reshape", [_linear(b, x, hidden, hidden), split_shape])], perm=[0, 2, 1, 3])
        scores = b.op("Div", [b.op("MatMul", [q, k]), b.const(np.array(np.sqrt(head_dim), np.float32))])
        probs = b.op("Softmax", [b.op("Add", [scores, mask])], axis=-1)
        context = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        context = b.op("Reshape", [context, merge_shape])
        attn_out = _linear(b, context, hidden, hidden)
        x = _layer_norm(b, b.op("Add", [attn_out, x]), hidden)
        ff = _linear(b, _gelu(b, _linear(b, x, hidden, ffn)), ffn, hidden)
        x = _layer_norm(b, b.op("Add", [ff, x]), hidden)
    b.rename_output(x, "last_hidden_state")
    return b.model(
        [
            helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, ["batch", "seq", hidden]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])],
        "transformer",
    )


def lstm(seed: int = 0, features: int = 16, hidden: int = 32, classes: int = 4, seq: int = 8) -> onnx.ModelProto:
    """One LSTM layer over [seq,batch,features] and a classifier on the last hidden state."""
    b = GraphBuilder(seed)
    w = b.weight(1, 4 * hidden, features)
    r = b.weight(1, 4 * hidden, hidden)
    bias = b.const(np.zeros((1, 8 * hidden), np.float32))
    _, h_last = b.op("LSTM", ["sequence", w, r, bias], n_outputs=2, hidden_size=hidden)
    h = b.op("Squeeze", [h_last, b.const(np.array([0], np.int64))])
    x = _linear(b, h, hidden, classes)
    b.rename_output(x, "logits")
    return b.model(
        [helper.make_tensor_value_info("sequence", TensorProto.FLOAT, [seq, "batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        "lstm",
    )


def redundant(seed: int = 0, features: int = 16, classes: int = 4) -> onnx.ModelProto:
    """An MLP padded with no-op nodes: Identity, Dropout, a Cast to the same type, a Reshape to the
    same shape and a Transpose pair that cancels. Exactly 5 nodes (6 counting both Transposes) do nothing."""
    b = GraphBuilder(seed)
    x = b.op("Identity", ["features"])
    x = b.op("Dropout", [x])
    x = b.op("Cast", [x], to=TensorProto.FLOAT)
    x = b.op("Reshape", [x, b.const(np.array([-1, features], np.int64))])
    x = b.op("Transpose", [x], perm=[1, 0])
    x = b.op("Transpose", [x], perm=[1, 0])
    x = _linear(b, x, features, classes)
    b.rename_output(x, "logits")
    return b.model(
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        "redundant",
    )


def elementwise(features: int = 16) -> onnx.ModelProto:
    """Abs -> Sqrt -> Tanh, no weights: nothing for a quantizer to quantize."""
    b = GraphBuilder(0)
    x = b.op("Tanh", [b.op("Sqrt", [b.op("Abs", ["features"])])])
    b.rename_output(x, "values")
    return b.model(
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", features])],
        "elementwise",
    )


def typed_io(features: int = 4) -> onnx.ModelProto:
    """One input and output per kind a wire protocol must carry: FP16, BOOL, UINT8, strings.

    `half` [batch,features] fp16 -> `half_twice` = half + half; `flag` bool -> `flag_not`;
    `small` uint8 -> `small_same`; `text` string [batch] -> `text_same`.
    """
    b = GraphBuilder(0)
    b.rename_output(b.op("Add", ["half", "half"]), "half_twice")
    b.rename_output(b.op("Not", ["flag"]), "flag_not")
    b.rename_output(b.op("Identity", ["small"]), "small_same")
    b.rename_output(b.op("Identity", ["text"]), "text_same")
    return b.model(
        [helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["batch", features]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, ["batch", features]),
         helper.make_tensor_value_info("small", TensorProto.UINT8, ["batch", features]),
         helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("half_twice", TensorProto.FLOAT16, ["batch", features]),
         helper.make_tensor_value_info("flag_not", TensorProto.BOOL, ["batch", features]),
         helper.make_tensor_value_info("small_same", TensorProto.UINT8, ["batch", features]),
         helper.make_tensor_value_info("text_same", TensorProto.STRING, ["batch"])],
        "typed_io",
    )


def scalar_input() -> onnx.ModelProto:
    """y = x * float(sr), sr a rank-0 int64 input: Silero VAD takes its sample rate so."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "sr_f"], ["y"])],
        "scalar_input",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def random_feed(model: onnx.ModelProto, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for one run: dynamic dims named "batch" get `batch`, any other dynamic dim gets `seq`."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in model.graph.input:
        dims = []
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            else:
                dims.append(batch if d.dim_param == "batch" else seq)
        elem = inp.type.tensor_type.elem_type
        if elem == TensorProto.INT64:
            feed[inp.name] = np.ones(dims, np.int64)
        else:
            feed[inp.name] = rng.normal(0, 1, size=dims).astype(helper.tensor_dtype_to_np_dtype(elem))
    return feed


def zipmap_classifier() -> onnx.ModelProto:
    """What scikit-learn classifiers export by default (skl2onnx): a label tensor and probabilities as a
    sequence of maps (ZipMap), which ONNX Runtime returns as a list of dicts, not an array."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    probs = helper.make_value_info("probabilities", helper.make_sequence_type_proto(helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"])
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=1),
             helper.make_node("ZipMap", ["p"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
             helper.make_node("ArgMax", ["x"], ["label"], axis=1, keepdims=0)]
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("ai.onnx.ml", 1)]
    model = helper.make_model(helper.make_graph(nodes, "zipmap", [x], [label, probs]), opset_imports=opsets)
    model.ir_version = IR_VERSION
    return model


def calibration_npz(model: onnx.ModelProto, samples: int = 24) -> bytes:
    """A calibration .npz for `model`: `samples` rows of `random_feed` (batch 1, seeds 0..samples-1) per input."""
    feeds = [random_feed(model, batch=1, seed=i) for i in range(samples)]
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})
    return buffer.getvalue()

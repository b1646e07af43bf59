"""inspect() finds exactly the redundant nodes, fusable chains and fused ops the builders put in."""

from __future__ import annotations

import json

import numpy as np
import onnx

from optimizer.graph_inspect import (
    ATTENTION,
    CONV_ACT,
    CONV_BN,
    GELU,
    GEMM_WITH_BIAS,
    LAYER_NORM,
    MATMUL_ADD,
    guess_attention_shape,
    inspect,
    is_transformer,
)
from tests import models


def _names(model: onnx.ModelProto, *ops: str) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type in ops]


def _patterns(report) -> dict[str, int]:
    return {chain.pattern: chain.count for chain in report.fusable}


def test_summary_of_the_mlp() -> None:
    report = inspect(models.mlp(features=64, hidden=128, classes=10))
    assert report.node_count == 8
    assert report.op_histogram == {"Add": 3, "MatMul": 3, "Relu": 2}
    assert list(report.op_histogram) == ["Add", "MatMul", "Relu"]  # count desc, then name
    expected_params = 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert report.parameter_count == expected_params
    assert report.parameter_bytes == 4 * expected_params
    assert report.ir_version == models.IR_VERSION
    assert report.opsets == {"ai.onnx": models.OPSET}
    data = json.loads(json.dumps(report.to_dict()))
    assert data["inputs"] == [{"name": "features", "dtype": "float32", "shape": ["batch", 64]}]
    assert data["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]


def test_transformer_inputs_keep_named_dims_and_int64() -> None:
    report = inspect(models.transformer(hidden=64))
    assert [(i.name, i.dtype, i.shape) for i in report.inputs] == [
        ("hidden_states", "float32", ["batch", "seq", 64]),
        ("attention_mask", "int64", ["batch", "seq"]),
    ]


def test_redundant_finds_exactly_the_noop_nodes() -> None:
    model = models.redundant()
    report = inspect(model)
    kinds = sorted(f.kind for f in report.redundant)
    assert kinds == ["cast_same_type", "dropout", "identity", "reshape_same_shape", "transpose_pair"]
    flagged = sorted(name for f in report.redundant for name in f.nodes)
    assert flagged == sorted(_names(model, "Identity", "Dropout", "Cast", "Reshape", "Transpose"))
    assert len(flagged) == 6
    pair = next(f for f in report.redundant if f.kind == "transpose_pair")
    assert pair.nodes == _names(model, "Transpose")
    assert all(f.reason for f in report.redundant)
    assert _patterns(report) == {MATMUL_ADD: 1}


def test_models_without_noops_have_no_redundant_findings() -> None:
    # The transformer has a Cast int64->float, shape-changing Reshapes and unpaired Transposes.
    for model in (models.cnn(), models.mlp(), models.transformer(), models.lstm()):
        assert inspect(model).redundant == [], model.graph.name


def test_cnn_conv_bn_and_conv_relu_chains() -> None:
    model = models.cnn(channels=(8, 16))
    report = inspect(model)
    assert _patterns(report) == {CONV_BN: 2, CONV_ACT: 2}
    conv_bn = next(c for c in report.fusable if c.pattern == CONV_BN)
    convs, bns = _names(model, "Conv"), _names(model, "BatchNormalization")
    assert conv_bn.nodes == [[c, b] for c, b in zip(convs, bns, strict=True)]
    conv_act = next(c for c in report.fusable if c.pattern == CONV_ACT)
    assert [chain[-1] for chain in conv_act.nodes] == _names(model, "Relu")
    assert report.fused == {GEMM_WITH_BIAS: 1}  # the classifier Gemm has its bias
    assert not is_transformer(report)


def test_mlp_matmul_add_chains() -> None:
    model = models.mlp()
    chain = next(c for c in inspect(model).fusable if c.pattern == MATMUL_ADD)
    assert chain.count == 3
    assert [pair[0] for pair in chain.nodes] == _names(model, "MatMul")
    assert [pair[1] for pair in chain.nodes] == _names(model, "Add")


def test_transformer_layernorm_gelu_attention() -> None:
    model = models.transformer(layers=2)
    report = inspect(model)
    # Per layer: q, k, v, output, two FFN projections; two LayerNorms, one Gelu, one attention.
    assert _patterns(report) == {MATMUL_ADD: 12, LAYER_NORM: 4, GELU: 2, ATTENTION: 2}
    attention = next(c for c in report.fusable if c.pattern == ATTENTION)
    names = {node.name: node.op_type for node in model.graph.node}
    chain_ops = [[names[n] for n in chain] for chain in attention.nodes]
    assert chain_ops == [["MatMul", "Div", "Add", "Softmax", "MatMul"]] * 2
    layer_norm = next(c for c in report.fusable if c.pattern == LAYER_NORM)
    assert [names[n] for n in layer_norm.nodes[0]] == ["ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div"]
    assert report.fused == {}
    assert is_transformer(report)


def test_lstm_inspects_cleanly() -> None:
    report = inspect(models.lstm())
    assert report.node_count == 4
    assert report.redundant == []
    assert _patterns(report) == {MATMUL_ADD: 1}
    assert report.fused == {}
    assert not is_transformer(report)
    assert report.inputs[0].shape == [8, "batch", 16]


def test_guess_attention_shape() -> None:
    assert guess_attention_shape(models.transformer(hidden=64, heads=4)) == (4, 64)
    assert guess_attention_shape(models.transformer(hidden=96, heads=8)) == (8, 96)
    assert guess_attention_shape(models.cnn()) == (None, None)
    assert guess_attention_shape(models.lstm()) == (None, None)


def _dynamic_split_transformer(hidden: int = 64, heads: int = 4) -> onnx.ModelProto:
    """models.transformer with each head-splitting Reshape target written as current PyTorch exports do
    view(batch, seq, -1, head_dim): Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)),
    [-1], [head_dim]), so the graph states head_dim but not the number of heads."""
    from onnx import helper, numpy_helper

    model = models.transformer(hidden=hidden, heads=heads)
    graph = model.graph
    wanted = [0, 0, heads, hidden // heads]
    split = next(t.name for t in graph.initializer if numpy_helper.to_array(t).tolist() == wanted)
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("idx0", 0), ("idx1", 1), ("ax0", [0]), ("minus1", [-1]), ("head_dim", [hidden // heads]))]
    graph.initializer.extend(consts)
    nodes = []
    for i, node in enumerate(graph.node):
        if node.op_type == "Reshape" and node.input[1] == split:
            x = node.input[0]
            pre = [helper.make_node("Shape", [x], [f"shape{i}"])]
            for axis in (0, 1):
                pre += [helper.make_node("Gather", [f"shape{i}", f"idx{axis}"], [f"dim{i}_{axis}"], axis=0),
                        helper.make_node("Unsqueeze", [f"dim{i}_{axis}", "ax0"], [f"udim{i}_{axis}"])]
            pre.append(helper.make_node("Concat", [f"udim{i}_0", f"udim{i}_1", "minus1", "head_dim"],
                                        [f"target{i}"], axis=0))
            nodes += pre
            node.input[1] = f"target{i}"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def test_guess_attention_shape_from_a_computed_split() -> None:
    """MiniLM exported by torch 2.13 splits heads with view(b, s, -1, 32): heads come from the projection width."""
    from optimizer.passes import cleanup

    model = _dynamic_split_transformer(hidden=64, heads=4)
    assert guess_attention_shape(model) == (4, 64)
    assert guess_attention_shape(_dynamic_split_transformer(hidden=96, heads=8)) == (8, 96)
    result = cleanup.run(model, feed=models.random_feed(model))
    assert result.changes["transformer_fusion"]["heads_source"] == "graph"
    assert result.changes["fusions"].get("Attention") == 1
    assert result.changes["max_abs_diff"]["last_hidden_state"] < 1e-3

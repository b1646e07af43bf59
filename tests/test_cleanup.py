"""The cleanup/fuse pass removes no-ops, folds BatchNorm, fuses transformers and keeps the outputs."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import pytest

from optimizer.errors import PassError
from optimizer.graph_inspect import ATTENTION, GELU, LAYER_NORM, inspect
from optimizer.passes import cleanup
from optimizer.passes.cleanup import CleanupConfig
from optimizer.runtime import cuda_is_usable
from tests import models

# ONNX Runtime's transformer optimizer warns that our test models were not exported by PyTorch.
logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("builder", [models.cnn, models.mlp, models.transformer, models.lstm, models.redundant])
def test_outputs_stay_within_tolerance(builder) -> None:
    model = builder()
    feed = models.random_feed(model, batch=3)
    result = cleanup.run(model, CleanupConfig(), feed=feed)
    assert result.changes["nodes_after"] < result.changes["nodes_before"]
    assert all(diff < 1e-4 for diff in result.changes["max_abs_diff"].values())
    assert list(result.changes["max_abs_diff"]) == [o.name for o in model.graph.output]
    assert result.changes["redundant_left"] == []


def test_redundant_nodes_are_removed() -> None:
    model = models.redundant()
    result = cleanup.run(model)
    changes = result.changes
    assert (changes["nodes_before"], changes["nodes_after"]) == (8, 1)
    # ONNX Runtime's basic level keeps Reshape(x[batch,16], [-1,16]); the pass removes it first.
    assert changes["removed_before_onnxruntime"] == {"Reshape": 1}
    assert changes["redundant_removed"] == {"Cast": 1, "Dropout": 1, "Identity": 1, "Reshape": 1, "Transpose": 2}
    assert changes["fusions"] == {"Gemm": 1}  # the MatMul+Add left over
    assert _ops(result.model) == {"Gemm": 1}
    assert len(model.graph.node) == 8  # the input model is left alone


def test_cnn_batchnorm_folds_into_conv() -> None:
    result = cleanup.run(models.cnn(channels=(8, 16)))
    ops = _ops(result.model)
    assert ops["BatchNormalization"] == 0
    assert ops["Conv"] == 2 and ops["Relu"] == 2
    assert (result.changes["nodes_before"], result.changes["nodes_after"]) == (9, 7)
    assert result.changes["removed"] == {"BatchNormalization": 2}
    assert result.changes["provider"] == "any"
    assert all(o.domain in ("", "ai.onnx") for o in result.model.opset_import)  # portable: standard ops only


def test_mlp_matmul_add_becomes_gemm() -> None:
    result = cleanup.run(models.mlp())
    assert _ops(result.model) == {"Gemm": 3, "Relu": 2}
    assert result.changes["fusions"] == {"Gemm": 3}
    assert result.changes["transformer_fusion"]["used"] is False


def test_extended_level_fuses_conv_activation_for_cpu() -> None:
    result = cleanup.run(models.cnn(channels=(8, 16)), CleanupConfig(level="extended", provider="cpu"))
    assert _ops(result.model)["FusedConv"] == 2
    assert result.changes["nodes_after"] == 5
    assert result.changes["provider"] == "cpu"


@pytest.mark.skipif(cuda_is_usable(), reason="CUDA works here, so the extended level for CUDA is allowed")
def test_extended_level_for_cuda_needs_cuda() -> None:
    with pytest.raises(PassError, match="CUDA"):
        cleanup.run(models.mlp(), CleanupConfig(level="extended", provider="cuda"))


@pytest.fixture(scope="module")
def fused_transformer() -> cleanup.PassResult:
    model = models.transformer(hidden=64, heads=4, layers=2)
    return cleanup.run(model, feed=models.random_feed(model, batch=2, seq=8))


def test_transformer_fuses_attention_skiplayernorm_biasgelu(fused_transformer) -> None:
    result = fused_transformer
    ops = _ops(result.model)
    assert ops["Attention"] == 2
    assert ops["SkipLayerNormalization"] == 4
    assert ops["BiasGelu"] == 2
    # Before: 5 mask nodes + 50 per layer. After: per layer Attention, 3 MatMul, 2 SkipLayerNormalization
    # and BiasGelu, plus one Cast of the mask to int32.
    assert (result.changes["nodes_before"], result.changes["nodes_after"]) == (105, 15)
    detail = result.changes["transformer_fusion"]
    assert detail["used"] is True
    assert (detail["num_heads"], detail["hidden_size"], detail["heads_source"]) == (4, 64, "graph")
    assert detail["operators"] == {"Attention": 2, "BiasGelu": 2, "SkipLayerNormalization": 4}
    assert result.changes["fusions"]["Attention"] == 2
    after = inspect(result.model)
    assert after.fusable_count(ATTENTION) == after.fusable_count(LAYER_NORM) == after.fusable_count(GELU) == 0
    assert after.fused["Attention"] == 2
    assert [(i.name, i.dtype) for i in after.inputs] == [("hidden_states", "float32"), ("attention_mask", "int64")]


def test_transformer_handles_left_padded_masks() -> None:
    # ONNX Runtime's "bert" default turns the mask into a sequence length (right padding only);
    # the pass keeps the raw mask, so a left-padded or holed mask still gives the original outputs.
    model = models.transformer()
    feed = models.random_feed(model, batch=2, seq=8)
    feed["attention_mask"][0, :3] = 0
    feed["attention_mask"][1, 5:] = 0
    result = cleanup.run(model, feed=feed)
    assert _ops(result.model)["Attention"] == 1
    assert result.changes["max_abs_diff"]["last_hidden_state"] < 1e-4


def test_transformer_fusion_can_be_turned_off() -> None:
    result = cleanup.run(models.transformer(), CleanupConfig(transformer="off"))
    ops = _ops(result.model)
    assert ops["Attention"] == 0 and ops["SkipLayerNormalization"] == 0
    assert ops["LayerNormalization"] == 2  # ONNX Runtime's basic level still fuses the standard op (opset 17)
    assert result.changes["transformer_fusion"] == {"used": False, "reason": "turned off"}


def test_given_heads_are_used() -> None:
    result = cleanup.run(models.transformer(hidden=64, heads=4), CleanupConfig(num_heads=4, hidden_size=64))
    detail = result.changes["transformer_fusion"]
    assert (detail["num_heads"], detail["hidden_size"], detail["heads_source"]) == (4, 64, "given")


def test_output_mismatch_raises() -> None:
    original, other = models.mlp(seed=0), models.mlp(seed=1)
    feed = models.random_feed(original)
    with pytest.raises(PassError, match="changed output 'logits'"):
        cleanup.compare_outputs(original, other, feed, atol=1e-4, rtol=1e-4)
    assert cleanup.compare_outputs(original, original, feed, atol=0.0, rtol=0.0) == {"logits": 0.0}


@pytest.mark.parametrize(("config", "message"), [
    (CleanupConfig(level="all"), "unknown level 'all'"),
    (CleanupConfig(transformer="maybe"), "unknown transformer setting 'maybe'"),
])
def test_bad_config_is_refused(config: CleanupConfig, message: str) -> None:
    with pytest.raises(PassError, match=message):
        cleanup.run(models.mlp(), config)


def test_synthetic_feed_fits_the_model() -> None:
    feed = cleanup.synthetic_feed(models.transformer(hidden=64))
    assert feed["hidden_states"].shape == (1, 8, 64) and feed["hidden_states"].dtype == np.float32
    assert feed["attention_mask"].dtype == np.int64 and np.all(feed["attention_mask"] == 1)


def _layer_norm_model(opset: int, hidden: int = 16) -> onnx.ModelProto:
    """x -> LayerNorm (as exported before opset 17) -> y, declared at `opset`; no residual, so the fuser
    writes a plain LayerNormalization (as in PP-OCRv4 recognition's last block)."""
    b = models.GraphBuilder(seed=3)
    b.rename_output(models._layer_norm(b, "x", hidden), "y")
    graph = onnx.helper.make_graph(
        b.nodes, "layer_norm", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4, hidden])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4, hidden])], b.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def test_opset12_layer_norm_is_fused_into_a_valid_model() -> None:
    """LayerNormalization exists from opset 17: an opset-12 model is converted up first, not left invalid."""
    model = _layer_norm_model(opset=12)
    feed = models.random_feed(model, batch=2)
    result = cleanup.run(model, feed=feed)
    assert _ops(result.model) == {"LayerNormalization": 1}
    assert cleanup.default_opset(result.model) == 17
    assert result.changes["transformer_fusion"]["opset_raised"] == {"from": 12, "to": 17}
    assert result.changes["max_abs_diff"]["y"] < 1e-4
    onnx.checker.check_model(result.model, full_check=True)
    assert cleanup.default_opset(model) == 12  # the input model is left alone


def test_opset17_layer_norm_keeps_its_opset() -> None:
    result = cleanup.run(_layer_norm_model(opset=17))
    assert _ops(result.model) == {"LayerNormalization": 1}
    assert "opset_raised" not in result.changes["transformer_fusion"]


def test_layer_norm_fusion_can_be_left_out_for_old_opsets() -> None:
    """The fallback when the opset cannot be raised: the transformer optimizer leaves LayerNorm decomposed."""
    model = _layer_norm_model(opset=12)
    fused, _detail = cleanup._transformer_fusion(model, CleanupConfig(), layer_norm=False)
    assert "LayerNormalization" not in _ops(fused)
    assert _ops(fused)["ReduceMean"] == 2
    onnx.checker.check_model(fused)


def _if_on_constant_model(rate: int) -> onnx.ModelProto:
    """y = x @ W16 if rate == 16000 else x @ W8, with `rate` a Constant: the condition folds to a constant."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    rng = np.random.default_rng(5)

    def branch(name: str) -> onnx.GraphProto:
        weight = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), f"w_{name}")
        relu = helper.make_node("Relu", [f"m_{name}"], [f"y_{name}"])
        return helper.make_graph([helper.make_node("MatMul", ["x", f"w_{name}"], [f"m_{name}"]), relu], name, [],
                                 [helper.make_tensor_value_info(f"y_{name}", onnx.TensorProto.FLOAT, None)], [weight])

    nodes = [
        helper.make_node("Constant", [], ["rate"], value=numpy_helper.from_array(np.array(rate, np.int64))),
        helper.make_node("Constant", [], ["k16"], value=numpy_helper.from_array(np.array(16000, np.int64))),
        helper.make_node("Equal", ["rate", "k16"], ["is16"]),
        helper.make_node("If", ["is16"], ["y"], then_branch=branch("then"), else_branch=branch("else")),
    ]
    graph = helper.make_graph(nodes, "if_const", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("rate", [16000, 8000])
def test_if_on_a_constant_condition_is_inlined(rate: int) -> None:
    """Compute inside If branches is invisible to the quantizer: ONNX Runtime's constant folding (basic level)
    folds the condition and inlines the taken branch, so the MatMul lands in the main graph."""
    model = _if_on_constant_model(rate)
    feed = {"x": np.random.default_rng(0).normal(size=(1, 8)).astype(np.float32)}
    result = cleanup.run(model, feed=feed)
    assert _ops(result.model) == {"MatMul": 1, "Relu": 1}
    branch = "then_branch" if rate == 16000 else "else_branch"
    weight = next(a.g.initializer[0] for a in model.graph.node[3].attribute if a.name == branch)
    kept = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert any(np.array_equal(w, onnx.numpy_helper.to_array(weight)) for w in kept.values())  # the taken branch
    assert result.changes["max_abs_diff"]["y"] < 1e-5

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

"""1-D Convs as im2col + MatMul (optimizer/passes/conv_matmul.py) and auto's "-c2m" dynamic INT8 candidate.

Real ONNX Runtime runs and quantizations on small built models: the rewrite keeps FP32 outputs, touches only
the Convs it can express as one MatMul, and on a 1-D CNN whose inputs' scale varies from sample to sample (as
Magika's LayerNorm output did: a range per run far below the calibration set's) static INT8 fails the strict
gate where the "-c2m" candidate passes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from optimizer.accuracy import Tolerance, compare, run_outputs
from optimizer.calibration import SampleSet
from optimizer.candidates import HEAVY_OPS, auto_plan, conv_matmul_candidate, static_candidate, u8s8_saturates
from optimizer.passes import conv_matmul
from optimizer.runtime import SessionSettings, create_session
from tests.models import GraphBuilder


def _mixed_convs(seed: int = 0) -> onnx.ModelProto:
    """x [N, 8, 32]: a 1-D Conv k=5 with bias (qualifies), one k=3 stride 2 (does not), and a 4-D Conv with a
    [3, 1] kernel on an [N, C, L, 1] view (qualifies)."""
    b = GraphBuilder(seed)
    y = b.op("Conv", ["x", b.weight(16, 8, 5), b.weight(16, scale=0.1)], kernel_shape=[5])
    y = b.op("Relu", [y])
    y = b.op("Conv", [y, b.weight(16, 16, 3)], kernel_shape=[3], strides=[2])
    y4 = b.op("Unsqueeze", [y, b.const(np.array([3], np.int64))])
    y4 = b.op("Conv", [y4, b.weight(12, 16, 3, 1), b.weight(12, scale=0.1)], kernel_shape=[3, 1])
    out = b.op("Squeeze", [y4, b.const(np.array([3], np.int64))])
    b.nodes[-1].output[0] = "y"
    del out
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 32])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12, 11])], "mixed_convs")


def _conv1d_classifier(seed: int = 0, channels: int = 32, filters: int = 64, length: int = 96,
                       classes: int = 8) -> onnx.ModelProto:
    """Conv1d k=5 -> Relu -> global max over positions -> Gemm -> class scores (Magika's shape, small)."""
    b = GraphBuilder(seed)
    y = b.op("Conv", ["x", b.weight(filters, channels, 5), b.weight(filters, scale=0.1)], kernel_shape=[5])
    y = b.op("Relu", [y])
    y = b.op("ReduceMax", [y], axes=[2], keepdims=0)
    b.op("Gemm", [y, b.weight(classes, filters), b.weight(classes, scale=0.1)], transB=1)
    b.nodes[-1].output[0] = "logits"
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, length])],
                   [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], "conv1d_classifier")


def _feeds(n: int, seed: int, loud_every: int = 0) -> list[dict[str, np.ndarray]]:
    """Rows of one sample each; every `loud_every`-th is 40x louder (the calibration set's wide range)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        x = rng.normal(0, 1, size=(1, 32, 96)).astype(np.float32)
        if loud_every and i % loud_every == 0:
            x *= 40
        feeds.append({"x": x})
    return feeds


def test_the_rewrite_keeps_fp32_outputs_and_takes_only_the_convs_one_matmul_can_express() -> None:
    model = _mixed_convs()
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert conv_matmul.qualifying(model) == [convs[0], convs[2]]  # the stride-2 Conv stays
    rewritten, done = conv_matmul.rewrite(model)
    assert done == [convs[0], convs[2]]
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("Conv") == 1 and ops.count("MatMul") == 2
    assert {n.name for n in rewritten.graph.node if n.op_type == "MatMul"} == {f"{convs[0]}/mm", f"{convs[2]}/mm"}
    onnx.checker.check_model(rewritten)
    feed = {"x": np.random.default_rng(1).normal(size=(3, 8, 32)).astype(np.float32)}
    want = create_session(model.SerializeToString()).run(None, feed)[0]
    got = create_session(rewritten.SerializeToString()).run(None, feed)[0]
    assert got.shape == want.shape == (3, 12, 11)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_c2m_passes_the_strict_gate_where_static_int8_fails_on_inputs_whose_scale_varies_per_sample() -> None:
    model = _conv1d_classifier()
    calibration = _feeds(24, seed=2, loud_every=4)
    holdout = _feeds(300, seed=3)  # 300 rows: a top-1 of 100% proves 99% (the strict gate's bound)
    samples = SampleSet(calibration=calibration, holdout=holdout, synthetic=False, source="test")
    reference = run_outputs(create_session(model.SerializeToString(), SessionSettings()), holdout)

    def judged(candidate) -> object:
        built = candidate.build(model, samples).model
        return compare(reference, run_outputs(create_session(built.SerializeToString(), SessionSettings()), holdout),
                       Tolerance())

    static = judged(static_candidate("minmax", "qdq", "uint8", HEAVY_OPS))
    # On an x86 CPU without VNNI ONNX Runtime's U8S8 kernels saturate int16 pairs: there auto also plans the twin
    # with 7-bit weights, the more accurate one (AVX2 EPYC: 8-bit 98.0% of the 300 decisions, 7-bit 99.7%, which 300
    # rows cannot prove to be 99%; a VNNI Xeon: 8-bit 100%, passing).
    saturates = u8s8_saturates()
    c2m = judged(conv_matmul_candidate(reduce_range=saturates))
    assert not static.passed, "static INT8 should lose the quiet rows to the loud ones' range"
    if saturates:
        assert c2m.outputs["logits"].top1 >= 0.99, c2m.reason
        assert c2m.outputs["logits"].top1 > judged(conv_matmul_candidate()).outputs["logits"].top1
    else:
        assert c2m.passed, c2m.reason
    assert c2m.outputs["logits"].cosine > static.outputs["logits"].cosine
    # plain dynamic INT8 is as accurate but runs the Conv as ConvInteger (0.25-0.7x FP32 on Magika); "-c2m" runs
    # it on the MatMul kernels
    ops = {n.op_type for n in conv_matmul_candidate().build(model, samples).model.graph.node}
    assert "MatMulInteger" in ops and "ConvInteger" not in ops and "Conv" not in ops


def test_auto_plans_c2m_only_for_a_model_with_a_qualifying_conv() -> None:
    def names(source: onnx.ModelProto) -> list[str]:
        plan = auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=False, source=source,
                         cpu=frozenset({"avx2", "avx512_vnni"}))
        return [c.name for c in plan.candidates]

    assert "int8-dynamic-s8-pc-c2m" in names(_conv1d_classifier())
    strided = _conv1d_classifier()
    conv = next(n for n in strided.graph.node if n.op_type == "Conv")
    conv.attribute.append(helper.make_attribute("strides", [2]))
    assert "int8-dynamic-s8-pc-c2m" not in names(strided)


def test_a_repair_that_names_the_conv_or_the_gemm_leaves_that_one_in_float() -> None:
    model = _conv1d_classifier()
    feeds = _feeds(4, seed=5)
    samples = SampleSet(calibration=feeds[:2], holdout=feeds[2:], synthetic=False, source="test")
    conv, gemm = (next(n.name for n in model.graph.node if n.op_type == op) for op in ("Conv", "Gemm"))

    def integer_matmuls(exclude: tuple[str, ...]) -> int:
        built = conv_matmul_candidate(exclude=exclude, suffix="repair").build(model, samples).model
        return sum(n.op_type == "MatMulInteger" for n in built.graph.node)

    assert integer_matmuls(()) == 2
    assert integer_matmuls((conv,)) == 1  # the Conv's "<name>/mm" MatMul is found by the Conv's name
    assert integer_matmuls((gemm,)) == 1
    assert conv_matmul_candidate(exclude=(gemm,), suffix="repair").name == "int8-dynamic-s8-pc-c2m-repair"

"""Static INT8 building blocks the auto search leans on: shared calibration and surviving a tool crash.

Real ONNX Runtime quantization on small built models; every assertion compares models or numbers.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import PassError
from optimizer.passes import int8_static
from optimizer.passes.int8_dynamic import count_quantized_ops
from optimizer.runtime import SessionSettings, create_session
from tests import models

HEAVY = ("Conv", "MatMul", "Gemm")


def _feeds(model: onnx.ModelProto, count: int = 10) -> list[dict[str, np.ndarray]]:
    return [models.random_feed(model, batch=1, seed=i) for i in range(count)]


def _outputs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return create_session(model.SerializeToString(), SessionSettings()).run(None, feed)


@pytest.mark.parametrize(("method", "quant_format", "activation", "op_types"), [
    ("minmax", "qdq", "uint8", None),
    ("minmax", "qdq", "int8", HEAVY),
    ("minmax", "qoperator", "uint8", None),
    ("minmax", "qoperator", "uint8", HEAVY),
    ("percentile", "qdq", "uint8", HEAVY),
])
def test_a_build_with_shared_ranges_equals_a_build_that_calibrates_itself(
        method: str, quant_format: str, activation: str, op_types: tuple[str, ...] | None) -> None:
    model = models.cnn()
    feeds = _feeds(model)
    config = int8_static.Int8StaticConfig(method=method, quant_format=quant_format, activation_type=activation,
                                          op_types=op_types)
    own = int8_static.run(model, config, feeds[:8], feeds[8]).model
    shared = int8_static.SharedCalibration()
    # the cache is filled by a build of another scope and format: the ranges must not depend on either
    other = int8_static.Int8StaticConfig(method=method, quant_format="qdq" if quant_format == "qoperator" else
                                         "qoperator", op_types=None if op_types else HEAVY)
    int8_static.run(model, other, feeds[:8], feeds[8], shared)
    result = int8_static.run(model, config, feeds[:8], feeds[8], shared)

    assert result.changes["calibration_shared"] is True
    assert len(shared.calibrations) == 1 and shared.reused == 1
    assert result.model.SerializeToString(deterministic=True) == own.SerializeToString(deterministic=True)
    np.testing.assert_array_equal(_outputs(result.model, feeds[9])[0], _outputs(own, feeds[9])[0])


def test_shared_ranges_serve_a_repair_and_each_method_calibrates_once() -> None:
    model = models.cnn()
    feeds = _feeds(model)
    shared = int8_static.SharedCalibration()
    first = int8_static.run(model, int8_static.Int8StaticConfig(), feeds[:8], feeds[8], shared)
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    repaired = int8_static.run(model, int8_static.Int8StaticConfig(nodes_to_exclude=(conv,)), feeds[:8], feeds[8],
                               shared)
    int8_static.run(model, int8_static.Int8StaticConfig(method="percentile"), feeds[:8], feeds[8], shared)

    assert [c["method"] for c in shared.calibrations] == ["minmax", "percentile"]
    assert repaired.changes["calibration_shared"] is True
    assert sum(repaired.changes["quantized_ops"].values()) < sum(first.changes["quantized_ops"].values())
    # a different sample set is a different calibration, never a stale reuse
    int8_static.run(model, int8_static.Int8StaticConfig(), feeds[2:], feeds[0], shared)
    assert [c["method"] for c in shared.calibrations] == ["minmax", "percentile", "minmax"]


def _gemm_with_2d_bias() -> onnx.ModelProto:
    """MatMul -> Relu -> MatMul + Add(bias [1, 4]): quant_pre_process fuses the last pair into a Gemm
    whose bias is 2-D, and ONNX Runtime's quantizer raises on it (as on Magika's last Dense layer)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
               for name, shape in (("w1", (16, 16)), ("w2", (16, 4)), ("bias", (1, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="dense0"),
             helper.make_node("Relu", ["h"], ["r"], name="relu0"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="dense1"),
             helper.make_node("Add", ["m", "bias"], ["y"], name="dense1_bias")]
    graph = helper.make_graph(nodes, "gemm2d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_node_that_crashes_the_quantizer_is_left_in_float_and_the_rest_quantized() -> None:
    model = _gemm_with_2d_bias()
    feeds = [{"x": np.random.default_rng(i).normal(0, 1, (1, 16)).astype(np.float32)} for i in range(10)]
    # uint8 weights: without VNNI (this AVX2 CPU) ORT's u8s8 MatMul kernel saturates int16 pair sums, which put
    # dense0's per-channel int8 result 30% off; the u8u8 kernel does not saturate
    config = int8_static.Int8StaticConfig(activation_type="uint8", weight_type="uint8")
    shared = int8_static.SharedCalibration()
    result = int8_static.run(model, config, feeds[:8], feeds[8], shared)

    [culprit] = result.changes["tool_excluded_nodes"]
    assert culprit.startswith("dense1")  # the fused Gemm, named after the MatMul it came from
    assert any("failed on" in note for note in result.notes)
    counts = count_quantized_ops(result.model)
    assert sum(counts.values()) >= 1  # dense0 is still quantized
    gemms = [n for n in result.model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 1 and gemms[0].name == culprit  # left in float
    reference = _outputs(model, feeds[9])[0]
    got = _outputs(result.model, feeds[9])[0]
    assert np.abs(got - reference).max() < 0.1 * np.abs(reference).max()
    # a repair of the same configuration starts from the known culprit instead of searching again
    again = int8_static.run(model, config, feeds[:8], feeds[8], shared)
    assert again.changes["tool_excluded_nodes"] == [culprit]


def test_a_failure_that_is_no_nodes_fault_is_still_a_pass_error() -> None:
    model = models.cnn()
    feeds = _feeds(model)
    # an override for a tensor the model lacks makes quantize_static raise whichever nodes are left in
    # float: the crash search must give up and report the tool's own error
    config = int8_static.Int8StaticConfig(extra_options={"TensorQuantOverrides": {"no_such_tensor": [{"scale": 1.0}]}})
    with pytest.raises(PassError, match="quantize_static failed: Tensor 'no_such_tensor'"):
        int8_static.run(model, config, feeds[:8], feeds[8], int8_static.SharedCalibration())


def test_auto_reports_the_node_the_quantizer_failed_on(tmp_path) -> None:
    from optimizer.auto import format_table
    from optimizer.pipeline import OptimizeConfig, optimize
    from tests.test_auto import _npz

    model = _gemm_with_2d_bias()
    name = "int8-static-minmax-qdq-u8s8-all"
    config = OptimizeConfig(auto_candidates=(name,), auto_prune_by_latency=False, benchmark_seconds=0.2,
                            batch_sizes=(1,), min_top1=0.5)  # its few held-back rows prove 50%, not 99%: build
    report = optimize(model.SerializeToString(), out_dir=tmp_path, config=config, calibration=_npz(model)).report
    row = next(c for c in report["auto"]["candidates"] if c["name"] == name)
    assert row["status"] in ("ok", "rejected")  # built: before, quantize_static's exception failed it
    [culprit] = row["tool_excluded_nodes"]
    assert culprit.startswith("dense1")
    assert f"quantizer failed on {culprit}: left in float" in format_table(report)

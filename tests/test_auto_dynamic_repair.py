"""The mixed-precision repair of a dynamic INT8 variant: ranked against the float model, repaired by the same loop
as static, on a built MLP whose two MatMuls each read an activation with one huge channel.

Latency pruning is off (as in tests/test_auto.py) so what is asserted does not depend on this machine's speed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from optimizer import auto, sensitivity
from optimizer.auto import accuracy_margin
from optimizer.candidates import dynamic_candidate
from optimizer.passes import int8_dynamic
from tests import models
from tests.test_auto import search_on

OUTLIER = 300.0
# U8 weights: on a CPU without VNNI (AVX2 only), ORT's u8s8 integer kernels add byte products in pairs into
# saturating int16 (255*127 twice overflows), which puts every S8 layer several % off on its own and would hide
# which layers the outliers break. U8U8 takes another kernel path; the outlier breaks it just the same.
WEIGHTS = "uint8"


def outlier_mlp(features: int = 32, hidden: int = 64, layers: int = 5, fed: tuple[int, ...] = (1, 3),
                seed: int = 0) -> onnx.ModelProto:
    """MatMul+Add(+Relu) layers; the MatMuls listed in `fed` (0-based) read an activation whose channel 0 is
    OUTLIER x the others. The function is an ordinary MLP's (the producing layer scales channel 0 up, Relu
    commutes with it, the reading layer scales its weight row back down), but dynamic quantization gives that
    activation one scale per tensor and rounds the other channels away."""
    b = models.GraphBuilder(seed)
    dims = [features] + [hidden] * layers
    x = "features"
    for i in range(layers):
        w = b.rng.normal(0, 1 / np.sqrt(dims[i]), (dims[i], dims[i + 1])).astype(np.float32)
        bias = b.rng.normal(0, 0.1, dims[i + 1]).astype(np.float32)
        if i + 1 in fed:  # this layer writes the outlier channel, kept positive so Relu passes it
            bias[0] = 2.0
            w[:, 0] *= OUTLIER
            bias[0] *= OUTLIER
        if i in fed:
            w[0, :] /= OUTLIER
        x = b.op("Add", [b.op("MatMul", [x, b.const(w)]), b.const(bias)])
        if i < layers - 1:
            x = b.op("Relu", [x])
    b.rename_output(x, "embedding")  # an embedding: judged on cosine, not top-1
    return b.model([helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
                   [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])], "outlier_mlp")


def _matmuls(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "MatMul"]


def test_rank_dynamic_puts_the_matmuls_that_read_the_outliers_first() -> None:
    model = outlier_mlp()
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(8)]
    config = int8_dynamic.Int8DynamicConfig(weight_type=WEIGHTS, per_channel=True)
    quantized = int8_dynamic.run(model, config, feeds[0]).model
    ranking = sensitivity.rank_dynamic(model, quantized, feeds)
    matmuls = _matmuls(model)
    assert sorted(n for t in ranking for n in t.nodes) == sorted(matmuls)  # each quantized MatMul, once
    assert {tuple(t.nodes) for t in ranking[:2]} == {(matmuls[1],), (matmuls[3],)}
    assert min(t.error for t in ranking[:2]) > 0.3  # most of their output is gone ...
    assert max(t.error for t in ranking[2:]) < 0.05  # ... the others add little to what they read

    # a node left in float is not ranked: there is nothing of it to repair
    config = int8_dynamic.Int8DynamicConfig(weight_type=WEIGHTS, per_channel=True, nodes_to_exclude=(matmuls[1],))
    partly = int8_dynamic.run(model, config, feeds[0]).model
    assert matmuls[1] not in {n for t in sensitivity.rank_dynamic(model, partly, feeds) for n in t.nodes}


def test_a_dynamic_variant_is_repaired_by_leaving_exactly_the_two_sensitive_matmuls_in_float() -> None:
    model = outlier_mlp()
    matmuls = _matmuls(model)
    search = search_on(model)
    target = search._add(dynamic_candidate(WEIGHTS, per_channel=True, prepared=search.prepared))
    assert target.row.status == "rejected"
    assert target.row.accuracy["outputs"]["embedding"]["cosine"] < 0.9
    search._repair()
    [repair] = search.repairs
    assert repair["head_nodes"] == [matmuls[-1]]  # the bias Add of the head is not quantized: not "left in float"
    assert [r["nodes"] for r in repair["ranking"][:2]] in ([[matmuls[1]], [matmuls[3]]], [[matmuls[3]], [matmuls[1]]])
    attempts = {a["name"].rsplit("-", 1)[-1]: a for a in repair["attempts"]}

    # each alone in float is not enough; they raise the margin more than any other MatMul does
    loo = [a for key, a in attempts.items() if key.startswith("loo")]
    assert all(a["status"] == "rejected" for a in loo)
    by_gain = sorted(loo, key=lambda a: -a["margin"])
    assert {tuple(a["excluded_nodes"]) for a in by_gain[:2]} == {(matmuls[1],), (matmuls[3],)}
    assert by_gain[0]["margin"] > accuracy_margin(target.row.accuracy, search.tolerance)
    # together they pass, and nothing else is left in float
    # the greedy union takes units whose leave-one-out raised the margin; with two broken layers, mending one may
    # not raise the worst metric, and then the ranking's top 2 are the union that passes
    assert repair["passed"].endswith(("repair-greedy2", "repair-top2"))
    passed = search.built[repair["passed"]].row
    assert passed.status == "ok" and passed.accuracy["outputs"]["embedding"]["cosine"] >= 0.99
    assert sorted(passed.settings["exclude_nodes"]) == sorted([matmuls[1], matmuls[3]])
    assert passed.changes["quantized_ops"]["MatMulInteger"] == len(matmuls) - 2
    # the source was pre-processed once for the target and every repair build
    assert search.prepared.reused == len(repair["attempts"])


def test_a_union_that_passes_is_bisected_down_to_the_fewest_units_that_pass() -> None:
    model = outlier_mlp(fed=(1, 2, 3))  # three MatMuls read an outlier channel: all three must stay float
    m = _matmuls(model)
    search = search_on(model)
    target = search._add(dynamic_candidate(WEIGHTS, per_channel=True, prepared=search.prepared))
    record: dict = {"attempts": [], "passed": None}
    units = [(m[1],), (m[2],), (m[3],), (m[0],), (m[4],)]
    assert search._smallest_union(target.row, units, "top", "units", record) is True
    # 1 and 2 units fail, 4 pass, then 3 (the middle) passes too: the three that read an outlier, no more
    assert [(a["name"].rsplit("-", 1)[-1], a["status"]) for a in record["attempts"]] == [
        ("top1", "rejected"), ("top2", "rejected"), ("top4", "ok"), ("top3", "ok")]
    assert record["passed"] == f"{target.row.name}-repair-top3"
    assert sorted(search.built[record["passed"]].row.settings["exclude_nodes"]) == sorted(m[1:4])
    # the same union asked again is the earlier outcome, not a second build
    assert search._union(target.row, units, 3, "top", "units", record) is True
    assert len(record["attempts"]) == 4


def test_leave_one_out_stops_at_its_share_and_the_ranking_union_still_repairs(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(auto, "LEAVE_ONE_OUT_SHARE", 0.0)  # its share is used up before the first unit
    model = outlier_mlp()
    m = _matmuls(model)
    search = search_on(model)
    search._add(dynamic_candidate(WEIGHTS, per_channel=True, prepared=search.prepared))
    search._repair()
    [repair] = search.repairs
    assert repair["note"] == "leave-one-out stopped after 0 units: its share of this repair's time was used"
    assert [a["name"].rsplit("-", 1)[-1] for a in repair["attempts"]] == ["head", "top1", "top2"]
    assert repair["passed"].endswith("repair-top2")
    assert sorted(search.built[repair["passed"]].row.settings["exclude_nodes"]) == sorted([m[1], m[3]])

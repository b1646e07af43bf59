"""precision=auto's choice of what to work on: repair targets, pruning by paired rounds, the scope of a repair,
and candidates that cannot apply. Rows are made by hand where only the choice is under test (no timing)."""

from __future__ import annotations

import numpy as np
import onnx

from optimizer.accuracy import Tolerance
from optimizer.auto import AutoSearch
from optimizer.calibration import synthetic_samples
from optimizer.candidates import EQUALIZE, HEAVY_OPS, auto_plan, static_candidate
from optimizer.latency import LatencyStats
from optimizer.runtime import SessionSettings
from optimizer.variants import Built, VariantReport
from tests import models
from tests.test_auto import search_on
from tests.test_auto_repair import _two_outliers
from tests.test_equalize import _conv_act_conv as conv_act_conv
from tests.test_smooth import _model as smooth_model

FP32_P50 = 2.0


def _search(model: onnx.ModelProto, rows: list[VariantReport]) -> AutoSearch:
    fused = VariantReport(name="fused", precision="fp32", status="ok", probe_latency_ms={"p50": FP32_P50})
    built = {"fused": Built(fused, model), **{r.name: Built(r) for r in rows}}
    return AutoSearch(source=model, samples=synthetic_samples(model), settings=SessionSettings(),
                      tolerance=Tolerance(), reference=[], provider="cpu", deadline=0.0, built=built,
                      fp32_name="fused")


def _failing(name: str, quant_format: str, activation: str, heavy: bool, cosine: float, p50: float) -> VariantReport:
    settings = {"mode": "static", "method": "minmax", "format": quant_format, "activation_type": activation,
                "weight_type": "int8", "per_channel": True, "op_types": list(HEAVY_OPS) if heavy else "all"}
    accuracy = {"passed": False, "outputs": {"out": {"checked": True, "passed": False, "cosine": cosine,
                                                     "slices": {"worst_cosine": cosine, "worst_error": 0.1}}}}
    return VariantReport(name=name, precision="int8", settings=settings, status="rejected", accuracy=accuracy,
                         probe_latency_ms={"p50": p50, "p90": p50})


def test_repair_targets_are_the_closest_to_passing_of_those_worth_the_speed_and_the_fastest() -> None:
    rows = [_failing("qop-u8-all", "qoperator", "uint8", False, cosine=0.10, p50=0.5),  # 4x, fails worst
            _failing("qdq-u8-all", "qdq", "uint8", False, cosine=0.50, p50=0.8),  # 2.5x, far off
            _failing("qdq-u8-heavy", "qdq", "uint8", True, cosine=0.97, p50=1.2),  # 1.67x, close
            _failing("qdq-s8-heavy", "qdq", "int8", True, cosine=0.989, p50=1.9)]  # closest, 1.05x: no gain left
    search = _search(models.mlp(), rows)
    search._repair()  # deadline passed: each target is chosen and recorded, nothing is built
    assert [r["target"] for r in search.repairs] == ["qdq-u8-heavy", "qop-u8-all"]
    skipped = {s["name"]: s["reason"] for s in search.skipped}
    for name in ("qdq-u8-all", "qdq-s8-heavy"):
        assert "the closest to passing of those at least 1.1x faster than fused" in skipped[f"{name} (repair)"]
    assert set(search.built) == {"fused", *(r.name for r in rows)}


def _stats(round_ms: list[float], p50: float) -> LatencyStats:
    return LatencyStats(batch=1, runs=len(round_ms), session_create_ms=0.0, warmup_runs=0, p50_ms=p50, p90_ms=p50,
                        p99_ms=p50, mean_ms=float(np.mean(round_ms)), throughput_per_s=1000 / p50, provider="cpu",
                        round_ms=round_ms)


def test_pruning_reads_paired_rounds_not_two_p50s() -> None:
    # under load a run is either run through or preempted (~5x): the variant's p50 landed in the slow mode,
    # FP32's in the fast one, yet in 4 of 5 rounds the variant was 1.11x faster than FP32 in the same round
    lucky = _failing("lucky-fp32", "qdq", "uint8", False, cosine=0.5, p50=0.0)
    slower = _failing("slower", "qdq", "int8", False, cosine=0.5, p50=0.0)
    search = _search(models.mlp(), [lucky, slower])
    fp32_rounds = [1.0, 1.0, 1.0, 5.0, 5.0]
    search._record_probe({"fused": _stats(fp32_rounds, 1.0), "lucky-fp32": _stats([0.9, 0.9, 4.5, 4.5, 4.5], 4.5),
                          "slower": _stats([1.2 * t for t in fp32_rounds], 1.2)})
    assert lucky.probe_latency_ms["p50"] == 4.5  # 4.5x slower by p50s ...
    assert search.not_worth_work(lucky) is None  # ... and worth work by paired rounds
    assert "(0.83x by paired rounds)" in search.not_worth_work(slower)


def test_a_repair_of_an_equalized_target_never_leaves_the_inserted_divs_in_float() -> None:
    model = conv_act_conv("Sigmoid")  # a 300x channel in the first Conv's output, read by a Sigmoid
    search = search_on(model)
    target = static_candidate("minmax", "qdq", "uint8", HEAVY_OPS, shared=search.shared, equalizing=EQUALIZE,
                              equalized=search.equalized)
    row = VariantReport(name=target.name, precision="int8", settings=target.settings)
    equalized = search.equalized.get(model, EQUALIZE, search.samples.calibration, search.samples.holdout[0]).model
    divs = [n.name for n in equalized.graph.node if n.name.endswith("_eqo_div")]
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    assert divs  # the Conv output was equalized: a Div after it, in float in the heavy scope
    assert search._in_scope(row, [conv, *divs]) == (conv,)


def test_candidates_that_cannot_apply_are_planned_as_skipped_not_built() -> None:
    plan = {}
    for producer in ("relu", "layernorm"):
        plan[producer] = auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=False,
                                   matmul_heavy=True, source=smooth_model(producer))
    assert "int8-dynamic-s8-pc-sq" in [c.name for c in plan["layernorm"].candidates]
    assert "int8-dynamic-s8-pc-sq" not in [c.name for c in plan["relu"].candidates]
    skipped = {s["name"]: s["reason"] for s in plan["relu"].skipped}
    assert skipped["int8-dynamic-s8-pc-sq"].startswith("skipped: nothing to smooth")
    # no Conv/MatMul/Gemm: the heavy-only static recipes quantize nothing; the all-op ones may
    elementwise = auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=False,
                            source=models.elementwise())
    names = [c.name for c in elementwise.candidates]
    assert "int8-static-minmax-qdq-u8s8-all" in names
    assert not [n for n in names if n.endswith("-heavy") or n.startswith("int8-dynamic")]
    skipped = {s["name"]: s["reason"] for s in elementwise.skipped}
    assert skipped["int8-static-minmax-qdq-u8s8-heavy"] == "skipped: nothing to quantize (no Conv/MatMul/Gemm node)"


def test_a_qoperator_target_is_ranked_on_its_qdq_twin_built_then_when_the_probe_deferred_it() -> None:
    model = _two_outliers()  # the head alone does not repair it: the ranking is needed
    search = search_on(model)
    twin = static_candidate("minmax", "qdq", "uint8", shared=search.shared)
    search.deferred = [twin]  # the probe ran out of its share before the twin
    target = search._add(static_candidate("minmax", "qoperator", "uint8", shared=search.shared))
    assert target.row.status == "rejected"
    search._repair()
    [repair] = search.repairs
    assert repair["ranking"], repair.get("note")
    assert twin.name in search.built and search.deferred == []  # built once, not again after the repair


def test_ops_inside_subgraphs_count_as_something_to_quantize() -> None:
    """Silero VAD's Convs and LSTM live inside If branches: the recipes that quantize them stay planned."""
    inner = models.mlp()
    branch = onnx.helper.make_graph(list(inner.graph.node), "branch", [], list(inner.graph.output),
                                    list(inner.graph.initializer))
    outer = onnx.helper.make_graph(
        [onnx.helper.make_node("If", ["cond"], [inner.graph.output[0].name], then_branch=branch, else_branch=branch)],
        "wrapped", [onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []), *inner.graph.input],
        list(inner.graph.output))
    plan = auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=False,
                     source=onnx.helper.make_model(outer))
    names = [c.name for c in plan.candidates]
    assert "int8-dynamic-s8-pc" in names and "int8-static-minmax-qdq-u8s8-heavy" in names, plan.skipped

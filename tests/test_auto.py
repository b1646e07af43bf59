"""precision=auto: the grid, the pruning, the mixed-precision repair and the time budget, on small built models.

Timing decides pruning in real runs; these tests turn latency pruning off (auto_prune_by_latency=False)
so what they assert does not depend on how fast this machine happens to be.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import onnx

from optimizer import sensitivity
from optimizer.accuracy import Tolerance, run_outputs
from optimizer.auto import AutoSearch, format_table, search_notes
from optimizer.calibration import load_samples, synthetic_samples
from optimizer.candidates import auto_plan, cpu_flags, static_candidate
from optimizer.passes import int8_static
from optimizer.pipeline import BASELINE, OptimizeConfig, optimize
from optimizer.runtime import SessionSettings, create_session
from optimizer.variants import Built, VariantReport
from tests import models

FAST = {"benchmark_seconds": 0.2, "batch_sizes": (1,)}
QDQ_U8 = "int8-static-minmax-qdq-u8s8-all"
GRID = {"int8-dynamic-s8-pc", "int8-dynamic-u8-pc"} | {
    f"int8-static-minmax-{fmt}-{act}s8-{scope}"
    for fmt in ("qdq", "qoperator") for act in ("u8", "s8") for scope in ("all", "heavy")
}


def _npz(model: onnx.ModelProto, samples: int = 24) -> bytes:
    return models.calibration_npz(model, samples)


def search_on(model: onnx.ModelProto) -> AutoSearch:
    """An auto search over `model` as its fused FP32 source, 20% held back, no latency pruning, 120 s to go."""
    samples = load_samples(_npz(model), model, holdout_fraction=0.2)
    reference = run_outputs(create_session(model.SerializeToString()), samples.holdout)
    return AutoSearch(source=model, samples=samples, settings=SessionSettings(), tolerance=Tolerance(),
                      reference=reference, provider="cpu", deadline=time.monotonic() + 120,
                      built={"fused": Built(VariantReport(name="fused", precision="fp32"), model)},
                      fp32_name="fused", prune_by_latency=False)


def _row(report: dict, name: str) -> dict:
    return next(c for c in report["auto"]["candidates"] if c["name"] == name)


def test_a_head_that_breaks_int8_is_left_in_float_and_the_repair_passes(tmp_path: Path) -> None:
    model = models.detector()
    head = model.graph.node[-1].name
    config = OptimizeConfig(auto_candidates=(QDQ_U8,), auto_prune_by_latency=False, **FAST)
    report = optimize(model.SerializeToString(), out_dir=tmp_path, config=config, calibration=_npz(model)).report

    broken = _row(report, QDQ_U8)
    assert broken["status"] == "rejected"
    assert "slice" in broken["reason"] and "detections" in broken["reason"]
    # one scale for boxes (~300) and scores (~1): the whole tensor looks fine, the score channels do not
    assert broken["accuracy"]["outputs"]["detections"]["cosine"] > 0.99
    assert broken["accuracy"]["outputs"]["detections"]["worst_slice_cosine"] < 0.5

    repair = report["auto"]["repairs"][0]
    assert repair["target"] == QDQ_U8
    assert repair["head_nodes"] == [head]
    repaired = _row(report, repair["passed"])
    assert repaired["settings"]["exclude_nodes"] == [head]
    assert repaired["settings"]["repair_of"] == QDQ_U8
    assert repaired["accuracy"]["passed"] is True
    assert repaired["accuracy"]["outputs"]["detections"]["worst_slice_cosine"] > 0.98
    assert repaired["status"] in ("ok", "rejected")  # rejected only for being slower than the original
    assert repaired["latency_ms"]["timing"] == "final"  # a repair is timed, not only scored
    if repaired["status"] == "rejected":
        assert "slower" in repaired["reason"]
    # the repair came first and passed, so the slow histogram methods were not needed
    skipped = {s["name"]: s["reason"] for s in report["auto"]["skipped"]}
    for method in ("percentile", "entropy"):
        assert skipped[f"int8-static-{method}-qdq-u8s8-all"] == f"the repaired {repair['passed']} already passes"
    served = report["selected"].removesuffix("-1thread")  # each may win on one intra-op thread (optimizer.threads)
    assert served in (BASELINE, "fused", repair["passed"])
    assert report["auto"]["excluded_nodes"] == (repaired["settings"]["exclude_nodes"]
                                                if served == repair["passed"] else [])
    assert set(report["auto"]["steps_s"]) >= {"probe_build", "probe_benchmark", "calibration_methods", "repair",
                                              "benchmark"}
    assert json.loads((tmp_path / "report.json").read_text())["auto"]["repairs"][0]["passed"] == repair["passed"]
    table = format_table(report)
    assert f"repair of {QDQ_U8}: {repair['passed']} (1 in float): ok" in table
    assert "not tried: int8-dynamic-s8-pc: not in the requested candidate list" in table


def test_sensitivity_ranks_the_broken_head_first_and_little_else() -> None:
    model = models.detector()
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(12)]
    qdq = int8_static.run(model, int8_static.Int8StaticConfig(activation_type="uint8"), feeds[:8], feeds[8]).model
    ranking = sensitivity.rank(qdq, feeds[:8])
    assert ranking[0].tensor == "detections"
    assert ranking[0].nodes == [model.graph.node[-1].name]
    assert ranking[0].error > 0.5  # the score channels are gone
    assert all(t.error < 0.05 for t in ranking[1:])  # the Relu tensors quantize well (folded Relu is not loss)
    assert {t.tensor for t in ranking} >= {"image", "detections"}


def test_head_nodes_follow_chains_to_the_last_heavy_node() -> None:
    assert sensitivity.head_nodes(models.detector()) == [models.detector().graph.node[-1].name]
    mlp = models.mlp()
    last_add, last_matmul = mlp.graph.node[-1].name, mlp.graph.node[-2].name
    assert sensitivity.head_nodes(mlp) == [last_add, last_matmul]  # the bias Add adds a weight: a chain
    assert sensitivity.head_nodes(mlp, limit=1) == [last_add]
    # LayerNorm's Div merges two activations: the walk stops there instead of crossing the whole network
    names = [n.name for n in models.transformer().graph.node]
    assert names[-3].startswith("Div")
    assert sensitivity.head_nodes(models.transformer()) == [names[-1], names[-2], names[-3]]


def test_when_nothing_is_faster_the_original_or_fused_fp32_is_served(tmp_path: Path) -> None:
    # 8 generated rows prove a top-1 of 74.7% at most: ask for 70% so the search runs at all
    report = optimize(models.elementwise().SerializeToString(), out_dir=tmp_path,
                      # one thread: no one-thread twin (optimizer.threads), which may be faster on a tiny model
                      config=OptimizeConfig(auto_prune_by_latency=False, min_top1=0.7, threads=1, **FAST)).report
    assert report["selected"] in (BASELINE, "fused")
    rows = {c["name"]: c for c in report["auto"]["candidates"]}
    skipped = {s["name"]: s["reason"] for s in report["auto"]["skipped"]}
    for name in ("int8-dynamic-s8-pc", "int8-dynamic-u8-pc"):  # no op to quantize: planned as skipped, not built
        assert name not in rows
        assert skipped[name].startswith("skipped: nothing to quantize")
    assert "calibration set" in skipped["int8-static"]
    assert "int8-static-minmax-qdq-u8s8-all" not in rows
    assert report["auto"]["excluded_nodes"] == []
    assert report["auto"]["repairs"] == []
    assert "fastest" in report["auto"]["rule"]


def test_a_tiny_budget_skips_the_grid_with_reasons_and_still_writes_the_report(tmp_path: Path) -> None:
    model = models.cnn()
    config = OptimizeConfig(time_budget_s=0.001, fp16_on_cpu=False, **FAST)
    report = optimize(model.SerializeToString(), out_dir=tmp_path, config=config, calibration=_npz(model)).report
    rows = {c["name"]: c for c in report["auto"]["candidates"]}
    # this machine's grid (the pipeline plans for the CPU it runs on: "-rr" twins and no S8S8 without VNNI)
    grid = {c.name for c in auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=False)
            .candidates}
    assert grid >= GRID - {n for n in GRID if "-s8s8-" in n}
    assert set(rows) >= grid  # the whole CPU grid was planned ...
    for name in grid:  # ... and none of it built
        assert rows[name]["status"] == "skipped"
        assert "time budget" in rows[name]["reason"]
    assert "fp16" in {s["name"] for s in report["auto"]["skipped"]}
    assert report["selected"] == BASELINE
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["auto"]["selected"] == BASELINE
    assert (tmp_path / "model.onnx").exists()


def test_an_outlier_inside_the_network_is_found_by_the_sensitivity_ranking_and_left_in_float(tmp_path: Path) -> None:
    # channel 0 of the first block is 300x the others: one INT8 scale for that activation rounds the
    # other channels away, far from the head, so leaving the head in float cannot help
    model = models.detector(channels=(8, 16, 16), box_scale=1.0, hidden_outlier=300.0)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    config = OptimizeConfig(auto_candidates=(QDQ_U8,), auto_prune_by_latency=False, **FAST)
    report = optimize(model.SerializeToString(), out_dir=tmp_path, config=config, calibration=_npz(model)).report

    assert _row(report, QDQ_U8)["status"] == "rejected"
    repair = report["auto"]["repairs"][0]
    head, ranked = repair["attempts"]
    assert head["excluded_nodes"] == [convs[-1]] and head["status"] == "rejected"
    assert repair["ranking"][0]["tensor"] == model.graph.node[1].output[0]  # the first block's Relu output
    assert repair["ranking"][0]["nodes"] == convs[:2]  # its producer (Relu folded into Conv) and consumer
    assert ranked["excluded_nodes"] == convs[:2]
    assert repair["passed"] == ranked["name"]
    repaired = _row(report, ranked["name"])
    assert repaired["accuracy"]["passed"] is True
    assert repaired["settings"]["exclude_nodes"] == convs[:2]
    assert repaired["latency_ms"]["timing"] == "final"


def _probed(name: str, status: str, p50: float, precision: str = "int8") -> Built:
    row = VariantReport(name=name, precision=precision, status=status, probe_latency_ms={"p50": p50, "p90": p50})
    return Built(row)


def test_latency_pruning_spends_work_only_where_it_can_pay() -> None:
    model = models.mlp()
    built = {"fused": _probed("fused", "ok", 2.0, "fp32"), "fast-ok": _probed("fast-ok", "ok", 1.0),
             "fastest-bad": _probed("fastest-bad", "rejected", 0.5), "mid-bad": _probed("mid-bad", "rejected", 1.5),
             "slow-bad": _probed("slow-bad", "rejected", 3.0)}
    search = AutoSearch(source=model, samples=synthetic_samples(model), settings=SessionSettings(),
                        tolerance=Tolerance(), reference=[], provider="cpu", deadline=0.0, built=built,
                        fp32_name="fused")
    assert search.not_worth_work(built["fastest-bad"].row) is None
    assert "fast-ok already passes" in search.not_worth_work(built["mid-bad"].row)
    assert "vs fused 2.000 ms" in search.not_worth_work(built["slow-bad"].row)
    # a passing repair (built after the probe) counts at its target's probe time for pruning
    repaired = VariantReport(name="fastest-bad-repair-head", precision="int8", settings={"repair_of": "fastest-bad"})
    built[repaired.name] = Built(repaired)
    assert "fastest-bad-repair-head already passes and measured faster (0.500 ms" in search.not_worth_work(
        built["mid-bad"].row)
    search.prune_by_latency = False
    assert search.not_worth_work(built["slow-bad"].row) is None


def test_later_calibration_methods_run_once_per_scope_for_what_no_repair_saved() -> None:
    model = models.detector()
    search = search_on(model)
    qdq = search._add(static_candidate("minmax", "qdq", "uint8"))
    qoperator = search._add(static_candidate("minmax", "qoperator", "uint8"))
    assert qdq.row.status == qoperator.row.status == "rejected"  # the head breaks both, as above
    search.other_methods()
    for method in ("percentile", "entropy"):
        tried = search.built[f"int8-static-{method}-qdq-u8s8-all"].row
        assert tried.status == "rejected" and tried.settings["method"] == method
        assert f"int8-static-{method}-qoperator-u8s8-all" not in search.built
    skipped = {s["name"]: s["reason"] for s in search.skipped}
    assert skipped["int8-static-entropy-qoperator-u8s8-all"] == (
        "entropy ranges for this scope already failed on int8-static-entropy-qdq-u8s8-all")

    search.deadline = time.monotonic() + 0.01  # no time left for histograms: skipped with the estimate
    search.skipped.clear()
    search.built.pop("int8-static-percentile-qdq-u8s8-all")
    search.built.pop("int8-static-entropy-qdq-u8s8-all")
    search.other_methods()
    assert "would take ~" in {s["name"]: s["reason"] for s in search.skipped}["int8-static-percentile-qdq-u8s8-all"]


#: A VNNI CPU's flags: the grid without the reduce_range twins a CPU without VNNI adds (test_auto_reduce_range.py)
VNNI = cpu_flags("flags\t: sse4_1 avx2 avx512bw avx512_vnni")


def test_the_probe_grid_puts_what_likely_pays_first() -> None:
    plan = auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=False, cpu=VNNI)
    cnn = [c.name for c in plan.candidates]
    assert set(cnn) == GRID
    assert cnn[0] == "int8-static-minmax-qoperator-u8s8-all"
    assert cnn[-2:] == ["int8-static-minmax-qoperator-s8s8-all", "int8-static-minmax-qoperator-s8s8-heavy"]
    transformer = auto_plan(provider="cpu", method="minmax", has_calibration=True, fp16_on_cpu=True,
                            matmul_heavy=True, cpu=VNNI)
    names = [c.name for c in transformer.candidates]
    assert names[:2] == ["int8-dynamic-s8-pc", "int8-dynamic-u8-pc"]
    assert names[-1] == "fp16"
    cuda = auto_plan(provider="cuda", method="minmax", has_calibration=True)
    assert [c.name for c in cuda.candidates] == ["fp16"]
    assert "INT8" in cuda.skipped[0]["reason"]


def test_search_notes_wrap_a_long_reason_instead_of_cutting_it() -> None:
    reason = "measured slower than fused FP32 " + "and " * 60 + "upload more samples to prove it"
    auto = {"candidates": [], "repairs": [], "skipped": [{"name": "int8-x", "reason": reason}],
            "excluded_nodes": [], "rule": "r", "steps_s": {}}
    lines = "\n".join(search_notes(auto)).splitlines()
    assert lines[0].startswith("not tried: int8-x: ") and all(len(line) <= 120 for line in lines)
    assert " ".join(line.strip() for line in lines if not line.startswith("rule")).count("upload more samples") == 1

"""Outputs that are not numbers (a scikit-learn classifier's string `label`), the variants table's "unproven", the
guessed-gate hint's flag, and the library's version (review of the library and CLI: F1, F10, F9, F7)."""

from __future__ import annotations

import importlib.metadata
import json
import shlex
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import optimizer
from app.cli import main
from optimizer.accuracy import Tolerance, ToleranceError, compare, run_outputs
from optimizer.pipeline import OptimizeConfig, optimize
from optimizer.report_table import summary
from tests import models

LABELS = ["cat", "dog", "bird"]
FP32 = {"precision": "fp32", "benchmark_seconds": 0.2, "batch_sizes": (1,), "time_budget_s": 30.0}


def string_label_classifier() -> onnx.ModelProto:
    """What skl2onnx writes for a classifier with string class names and zipmap=False (what our ZipMap refusal tells
    users to export): float `probabilities` and a string `label` (ArgMax -> ai.onnx.ml LabelEncoder)."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["logits"], ["index"], axis=1, keepdims=0),
             helper.make_node("LabelEncoder", ["index"], ["label"], domain="ai.onnx.ml", keys_int64s=[0, 1, 2],
                              values_strings=LABELS)]
    graph = helper.make_graph(nodes, "string_label", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                     ["batch", 4])],
                              [helper.make_tensor_value_info("label", TensorProto.STRING, ["batch"]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _runs(model: onnx.ModelProto, rows: int) -> list[dict[str, np.ndarray]]:
    """The model's outputs on `rows` one-row samples, by real ONNX Runtime."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(rows, 1, 4)).astype(np.float32)
    return run_outputs(session, [{"x": row} for row in x])


def _other_label(runs: list[dict[str, np.ndarray]], flipped: int) -> list[dict[str, np.ndarray]]:
    """`runs` with the labels of the first `flipped` samples changed (the probabilities kept)."""
    out = [dict(run) for run in runs]
    for run in out[:flipped]:
        run["label"] = np.array(["bird" if run["label"][0] != "bird" else "cat"], dtype=object)
    return out


def test_a_string_output_is_compared_exactly_and_says_so() -> None:
    reference = _runs(string_label_classifier(), 8)
    judged = compare(reference, reference, Tolerance())
    label = judged.outputs["label"]
    assert judged.passed and label.metric == "exact" and label.passed
    assert (label.top1, label.top1_rows, label.top1_units, label.elements) == (1.0, 8, 8, 8)
    assert label.cosine is None and label.max_abs is None
    assert judged.to_dict()["outputs"]["label"]["metric"] == "exact"  # the report says which metric gated it

    # a variant that changes 1 label in 8 fails on it, whatever its probabilities say
    changed = compare(reference, _other_label(reference, 1), Tolerance())
    assert not changed.passed and not changed.unproven
    assert changed.outputs["label"].top1 == 7 / 8
    assert changed.reason == "output 'label': 87.50% of its values equal the original's < limit 99.00% (metric exact)"


def test_outputs_named_leave_the_string_output_measured_but_not_gating() -> None:
    reference = _runs(string_label_classifier(), 8)
    judged = compare(reference, _other_label(reference, 1), Tolerance(outputs=["probabilities"]))
    assert judged.passed and not judged.outputs["label"].checked and not judged.outputs["label"].passed


def test_the_exact_gate_is_min_top1_on_its_bound_not_100_percent() -> None:
    reference = _runs(string_label_classifier(), 1000)
    probabilities_off = [{**run, "probabilities": run["probabilities"] * np.float32(1.01)} for run in reference]
    # 999 of 1000 labels kept: the 99% asked for is proven (bound 99.5%), as top-1 on the scores would be
    one_flipped = compare(reference, _other_label(probabilities_off, 1), Tolerance()).outputs["label"]
    assert one_flipped.passed and one_flipped.top1 == 0.999 and one_flipped.top1_lower_95 > 0.99
    # all 8 agreeing prove only 74.7%: unproven, as top-1 on 8 rows is, for a variant that is not the same function
    few = _runs(string_label_classifier(), 8)
    scaled = [{**run, "probabilities": run["probabilities"] * np.float32(1.01)} for run in few]
    judged = compare(few, scaled, Tolerance(outputs=["label"]))
    assert not judged.passed and judged.unproven and judged.outputs["label"].samples_to_prove == 268
    assert judged.reason.startswith("output 'label': unproven: exact agreement 100.0% reaches the 99.0% asked for")
    # the same function up to float rounding (a fused FP32 graph): nothing to prove
    assert compare(few, few, Tolerance(outputs=["label"])).passed


def test_a_numeric_output_may_be_declared_exact_and_other_metrics_refuse_strings() -> None:
    reference = _runs(string_label_classifier(), 8)
    judged = compare(reference, reference, Tolerance(metrics={"probabilities": "exact"})).outputs["probabilities"]
    assert judged.metric == "exact" and judged.top1 == 1.0 and judged.cosine == pytest.approx(1.0)
    with pytest.raises(ToleranceError, match="'label' holds object values, not numbers: it can only be compared "
                                             r"exactly \(metric exact\), not by cosine"):
        compare(reference, reference, Tolerance(metrics={"label": "cosine"}))


def test_typed_io_outputs_compare_without_error() -> None:
    model = models.typed_io()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = [{"half": np.full((1, 4), i, np.float16), "flag": np.array([[True, False, True, i % 2 == 0]]),
              "small": np.full((1, 4), i, np.uint8), "text": np.array([f"t{i}"], dtype=object)} for i in range(6)]
    reference = run_outputs(session, feeds)
    judged = compare(reference, reference, Tolerance())
    assert judged.passed
    assert {name: out.metric for name, out in judged.outputs.items()} == {
        "half_twice": "default", "flag_not": "exact", "small_same": "default", "text_same": "exact"}


@pytest.mark.parametrize("outputs", [None, ["probabilities"]])
def test_optimize_a_string_label_classifier(tmp_path: Path, outputs: list[str] | None) -> None:
    result = optimize(string_label_classifier(), out_dir=tmp_path, config=OptimizeConfig(**FP32, outputs=outputs))
    fused = next(v for v in result.report["variants"] if v["name"] == "fused")
    label = fused["accuracy"]["outputs"]["label"]
    assert fused["accuracy"]["passed"], fused["accuracy"]["reason"]
    assert (label["metric"], label["top1"], label["checked"]) == ("exact", 1.0, outputs is None)
    assert "exact 100.00%" in summary(result.report) or outputs is not None
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    assert session.run(["label"], {"x": np.eye(3, 4, dtype=np.float32)})[0].dtype == object


def test_the_cli_optimizes_a_string_label_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "classifier.onnx"
    onnx.save(string_label_classifier(), path)
    assert main(["optimize", str(path), "--out", str(tmp_path / "out"), "--precision", "fp32",
                 "--time-budget", "20"]) == 0
    assert "pass cos 1.0000, exact 100.00%" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["variants"][1]["accuracy"]["outputs"]["label"]["metric"] == "exact"


def test_the_service_optimizes_a_string_label_classifier(serve) -> None:  # noqa: ANN001
    with serve() as api:
        accepted = api.upload(string_label_classifier(), "classifier.onnx", precision="fp32")
        assert accepted.status_code == 202, accepted.text
        job = api.wait(accepted.json()["job_id"])
        assert job["status"] == "succeeded", job
        answer = api.predict("classifier", {"x": np.eye(3, 4, dtype=np.float32)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"]["label"] == [LABELS[int(np.argmax(row))] for row in
                                                     np.eye(3, 4, dtype=np.float32) @ numpy_helper.to_array(
                                                         string_label_classifier().graph.initializer[0])]


def _unproven_report(tmp_path: Path) -> dict:
    """A real report where FP16 reaches min_top1 on its 8 held-back rows but cannot prove it (the review's mlp)."""
    return optimize(models.mlp(), out_dir=tmp_path, config=OptimizeConfig(**{**FP32, "precision": "fp16",
                                                                             "fp16_on_cpu": True})).report


def test_the_table_says_unproven_as_the_report_does(tmp_path: Path) -> None:
    report = _unproven_report(tmp_path)
    fp16 = next(v for v in report["variants"] if v["precision"] == "fp16")
    assert fp16["status"] == "rejected" and fp16["accuracy"]["unproven"] and not fp16["accuracy"]["passed"]
    line = next(line for line in summary(report).splitlines() if line.lstrip(" *").startswith(fp16["name"] + " "))
    assert " unproven cos " in line and "FAIL" not in line


def test_the_guessed_gate_hint_gives_a_flag_the_cli_takes(tmp_path: Path) -> None:
    reference = [{"output": np.array([[0.1, 0.9, 0.3]], np.float32)}] * 8
    reason = compare(reference, [{"output": r["output"] * np.float32(1.01)} for r in reference], Tolerance()).reason
    flag = shlex.split(reason.split("(on the command line: ", 1)[1].removesuffix(")"))
    assert flag == ["--metrics", '{"output": "cosine"}']
    model = models.mlp()
    model.graph.node[-1].output[0] = model.graph.output[0].name = "output"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert main(["optimize", str(path), "--out", str(tmp_path / "out"), "--precision", "fp32", "--time-budget", "20",
                 "--quiet", *flag]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["variants"][1]["accuracy"]["outputs"]["output"]["metric"] == "cosine"


def test_the_library_has_its_version() -> None:
    assert optimizer.__version__ == importlib.metadata.version("onnxforge")
    assert "__version__" in optimizer.__all__

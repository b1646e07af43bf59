"""A top-1 gate guessed from an output's shape and name says it is a guess, and a user can turn it off ("cosine").

A reviewer's speaker encoder (GE2E) served INT8 at 1.53x with its output named "embedding"; renamed "output", the same
model was guessed to give class scores, gated on top-1 that 12 held-back rows cannot prove, and INT8 was never tried:
the reasons neither said the gate was a guess nor how to turn it off. These tests run the real pipeline on small
models built with onnx.helper (tests.models).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.cli import main
from optimizer.accuracy import Tolerance, compare, output_roles
from optimizer.pipeline import OptimizeConfig, optimize
from tests import models

AUTO = {"benchmark_seconds": 0.2, "batch_sizes": (1,), "precision": "auto", "time_budget_s": 120.0,
        "auto_candidates": ("int8-dynamic-s8-pc",)}
HINT = ("the top-1 gate is a guess: 'output' looks like class scores ([batch, 10] float, name not an embedding's); "
        """if it is not class scores, say so: metrics {"output": "cosine"} (on the command line: """
        """--metrics '{"output": "cosine"}')""")


def _renamed(model: onnx.ModelProto, name: str = "output") -> onnx.ModelProto:
    """`model` with its one output renamed (the reviewer's GE2E with "embedding" renamed "output")."""
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [name if out == old else out for out in node.output]
    model.graph.output[0].name = name
    return model


def _l2_normalized(name: str = "output", features: int = 64, dims: int = 10) -> onnx.ModelProto:
    """An encoder whose output is divided by its L2 norm (as GE2E's: Div by ReduceL2), named `name`."""
    b = models.GraphBuilder(3)
    x = b.op("MatMul", ["features", b.weight(features, 32)])
    x = b.op("Relu", [x])
    x = b.op("MatMul", [x, b.weight(32, dims)])
    norm = b.op("ReduceL2", [x], axes=[1], keepdims=1)
    norm = b.op("Clip", [norm, b.const(np.array(1e-6, np.float32))])  # F.normalize's eps
    out = b.op("Div", [x, norm])
    b.rename_output(out, name)
    return b.model([helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
                   [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", dims])], "l2")


def _softmaxed(name: str) -> onnx.ModelProto:
    """tests.models.mlp with a Softmax on its logits, the output named `name`."""
    model = models.mlp()
    softmax = helper.make_node("Softmax", ["logits"], [name], axis=-1)
    model.graph.node.append(softmax)
    model.graph.output[0].name = name
    return model


def _npz(samples: int = 40, seed: int = 0) -> bytes:
    """`samples` one-row samples for a [batch, 64] "features" input: 20% (8 rows) are held back."""
    buf = io.BytesIO()
    np.savez(buf, features=np.random.default_rng(seed).normal(0, 1, (samples, 1, 64)).astype(np.float32))
    return buf.getvalue()


def _scores(name: str, rows: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{name: rng.normal(0, 1, (1, 10)).astype(np.float32)} for _ in range(rows)]


def test_a_guessed_top1_gate_says_so_and_how_to_turn_it_off() -> None:
    reference = _scores("output")
    scaled = [{"output": v["output"] * 1.01} for v in reference]  # same argmax, not float rounding: unproven
    judged = compare(reference, scaled, Tolerance()).outputs["output"]
    assert judged.unproven and judged.reason.endswith(HINT)
    flipped = [{"output": -v["output"]} for v in reference]
    failed = compare(reference, flipped, Tolerance(min_cosine=-1.0)).outputs["output"]
    assert failed.reason.startswith("output 'output': top-1 agreement 0.00% < limit 99.00% (the top-1 gate is a guess")
    # a name that says logits is no guess, and a declared top1 neither
    assert "guess" not in compare(_scores("logits"), [{"logits": v["output"] * 1.01} for v in reference],
                                  Tolerance()).reason
    assert "guess" not in compare(reference, scaled, Tolerance(metrics={"output": "top1"})).reason


def test_metric_cosine_gates_on_cosine_and_slices_without_top1() -> None:
    reference = _scores("output")
    scaled = [{"output": v["output"] * 1.01} for v in reference]
    judged = compare(reference, scaled, Tolerance(metrics={"output": "cosine"})).outputs["output"]
    assert judged.passed and judged.top1 is None and judged.metric == "cosine"
    noisy = [{"output": v["output"] + np.float32(1.0)} for v in reference]
    assert not compare(reference, noisy, Tolerance(metrics={"output": "cosine"})).passed  # cosine still gates


def test_auto_says_int8_was_not_tried_because_of_a_guessed_gate(tmp_path: Path) -> None:
    report = optimize(_renamed(models.mlp()).SerializeToString(), out_dir=tmp_path, calibration=_npz(),
                      config=OptimizeConfig(**AUTO)).report
    assert not [v for v in report["variants"] if v["precision"] in ("int8", "fp16")]
    skipped = report["auto"]["skipped"][0]
    assert skipped["name"] == "every INT8 and FP16 candidate" and skipped["reason"].endswith(HINT)
    assert report["selection_reason"].startswith("INT8 and FP16 were not tried (output 'output' is gated on top-1 "
                                                 "agreement >= 99.0%, and its 8 held-back unit(s)")
    assert HINT in report["selection_reason"] and "no variant was both" not in report["selection_reason"]


def test_metric_cosine_lets_auto_try_int8(tmp_path: Path) -> None:
    config = OptimizeConfig(**AUTO, metrics={"output": "cosine"})
    report = optimize(_renamed(models.mlp()).SerializeToString(), out_dir=tmp_path, calibration=_npz(),
                      config=config).report
    int8 = next(v for v in report["variants"] if v["name"] == "int8-dynamic-s8-pc")
    assert int8["accuracy"]["passed"], int8["accuracy"]["reason"]  # judged on cosine: no top-1 to prove
    assert int8["accuracy"]["outputs"]["output"]["top1"] is None
    assert not report["selection_reason"].startswith("INT8 and FP16 were not tried")


def test_the_cli_and_the_upload_parser_take_metric_cosine(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_renamed(models.mlp()), path)
    (tmp_path / "s.npz").write_bytes(_npz(12))
    assert main(["optimize", str(path), "--out", str(tmp_path / "out"), "--calibration", str(tmp_path / "s.npz"),
                 "--precision", "fp32", "--metrics", '{"output": "cosine"}', "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    fused = next(v for v in report["variants"] if v["name"] == "fused")
    assert fused["accuracy"]["outputs"]["output"]["metric"] == "cosine"


def test_an_l2_normalized_output_is_an_embedding_whatever_its_name(tmp_path: Path) -> None:
    model = _l2_normalized("output")
    assert output_roles(model) == {"output": ("embedding", "a Div by its L2 norm")}
    report = optimize(model.SerializeToString(), out_dir=tmp_path, calibration=_npz(),
                      config=OptimizeConfig(**AUTO)).report
    assert any(v["precision"] == "int8" for v in report["variants"])  # not skipped for an unprovable top-1
    fused = next(v for v in report["variants"] if v["name"] == "fused")
    assert fused["accuracy"]["outputs"]["output"]["top1"] is None


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax", "Sigmoid"])
def test_an_output_computed_by_softmax_is_class_scores_whatever_its_name(op: str) -> None:
    model = _softmaxed("embedding")
    model.graph.node[-1].op_type = op
    if op == "Sigmoid":
        del model.graph.node[-1].attribute[:]
    assert output_roles(model) == {"embedding": ("class scores", op)}
    reference = _scores("embedding")
    judged = compare(reference, [{"embedding": v["embedding"] * 1.01} for v in reference],
                     Tolerance(graph_roles=output_roles(model))).outputs["embedding"]
    assert judged.top1 is not None and judged.unproven
    assert f"the top-1 gate is a guess: 'embedding' is computed by {op}, so it looks like class scores" in judged.reason


def test_a_sigmoid_map_is_not_gated_on_top1() -> None:
    """A rank-4 probability map (a text detector's) has no classes on its last axis: the graph's Sigmoid says
    nothing about top-1 there."""
    roles = {"maps": ("class scores", "Sigmoid")}
    rng = np.random.default_rng(0)
    reference = [{"maps": rng.uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)} for _ in range(4)]
    judged = compare(reference, reference, Tolerance(graph_roles=roles)).outputs["maps"]
    assert judged.top1 is None and judged.passed

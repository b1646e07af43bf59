"""The repair's first step: an output Concat that joins a 0-300 box branch and a Sigmoid score branch is left in
float with the score branch's Sigmoid, so each branch keeps its own INT8 scale (NudeNet's YOLOv8 head, in small).

Latency pruning is off (as in tests/test_auto.py) so what is asserted does not depend on this machine's speed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from optimizer import sensitivity
from optimizer.candidates import static_candidate
from tests import models
from tests.test_auto import search_on

BOXES, CLASSES, IMAGE = 4, 3, 36  # 36 x 36 = 1296 positions: the slice check cuts the output along its channels


def box_score_detector(seed: int = 0, hidden_outlier: float = 1.0) -> onnx.ModelProto:
    """Two Conv-Relu blocks, then a box branch (Conv -> Sigmoid -> x300, like YOLOv5's decode) and a score
    branch (Conv -> Sigmoid), joined along the channels and flattened: detections [batch, 4 + 3, 1296].

    `hidden_outlier` scales channel 0 of the first block (and divides the next Conv's weights for it: the
    same function), a second INT8 failure away from the head that only a float first Conv pair repairs."""
    b = models.GraphBuilder(seed)
    x, in_ch = "image", 3
    for i, out_ch in enumerate((8, 16)):
        w = b.rng.normal(0, 1.0 / np.sqrt(in_ch * 9), size=(out_ch, in_ch, 3, 3)).astype(np.float32)
        bias = b.rng.normal(0, 0.1, size=out_ch).astype(np.float32)
        if i == 0:
            w[0] *= hidden_outlier
            bias[0] *= hidden_outlier
        else:
            w[:, 0] /= hidden_outlier
        x = b.op("Relu", [b.op("Conv", [x, b.const(w), b.const(bias)], pads=[1, 1, 1, 1])])
        in_ch = out_ch
    boxes = b.op("Mul", [b.op("Sigmoid", [b.op("Conv", [x, b.weight(BOXES, in_ch, 1, 1), b.weight(BOXES)])]),
                         b.const(np.array(300.0, np.float32))])
    scores = b.op("Sigmoid", [b.op("Conv", [x, b.weight(CLASSES, in_ch, 1, 1, scale=0.5), b.weight(CLASSES)])])
    joined = b.op("Concat", [boxes, scores], axis=1)
    out = b.op("Reshape", [joined, b.const(np.array([0, BOXES + CLASSES, -1], np.int64))])
    b.rename_output(out, "detections")
    return b.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["batch", BOXES + CLASSES, IMAGE * IMAGE])],
        "box_score_detector")


def _named(model: onnx.ModelProto, op_type: str) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == op_type]


def test_mixed_range_concats_finds_the_output_concat_and_the_score_sigmoid() -> None:
    model = box_score_detector()
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(4)]
    [found] = sensitivity.mixed_range_concats(model, feeds)
    concat, reshape, sigmoids = _named(model, "Concat")[0], _named(model, "Reshape")[0], _named(model, "Sigmoid")
    assert found.concat == concat
    assert found.nodes == [concat, reshape, sigmoids[1]]  # the score Sigmoid; the box branch keeps its scale
    boxes, scores = found.ranges.values()
    assert boxes[1] > 200 and scores[0] >= 0 and scores[1] <= 1  # 0-300 next to 0-1
    assert sensitivity.mixed_range_concats(model, feeds, outputs=["other"]) == []  # only the outputs asked about
    assert sensitivity.mixed_range_concats(models.detector(), feeds=[models.random_feed(models.detector())]) == []


def test_the_output_concat_and_score_sigmoid_are_left_in_float_in_one_build() -> None:
    model = box_score_detector()
    search = search_on(model)
    target = search._add(static_candidate("minmax", "qdq", "uint8", shared=search.shared))
    out = target.row.accuracy["outputs"]["detections"]
    # one scale for boxes and scores: the whole tensor looks fine, the score channels round to 0 or 1
    assert target.row.status == "rejected" and out["cosine"] > 0.99 and out["slices"]["worst_cosine"] < 0.9

    search._repair()
    [repair] = search.repairs
    [attempt] = repair["attempts"]  # no head, ranking or leave-one-out needed
    concat, reshape, score = _named(model, "Concat")[0], _named(model, "Reshape")[0], _named(model, "Sigmoid")[1]
    assert repair["passed"] == f"{target.row.name}-repair-concat" == attempt["name"]
    assert attempt["excluded_nodes"] == [concat, reshape, score]
    assert not set(attempt["excluded_nodes"]) & set(_named(model, "Conv"))  # every Conv stays INT8
    passed = search.built[repair["passed"]].row
    assert passed.status == "ok" and passed.accuracy["outputs"]["detections"]["slices"]["worst_cosine"] > 0.98
    assert repair["mixed_concats"][0]["small_inputs"] == [_score_output(model, score)]


def test_a_concat_fix_that_is_not_enough_is_kept_in_every_later_attempt() -> None:
    model = box_score_detector(hidden_outlier=300.0)
    search = search_on(model)
    target = search._add(static_candidate("minmax", "qdq", "uint8", shared=search.shared))
    assert target.row.status == "rejected"
    search._repair()
    [repair] = search.repairs
    first = repair["attempts"][0]
    concat_unit = [_named(model, "Concat")[0], _named(model, "Reshape")[0], _named(model, "Sigmoid")[1]]
    assert first["name"].endswith("repair-concat") and first["status"] == "rejected"
    assert repair["kept_in_float"] == concat_unit
    assert len(repair["attempts"]) > 1
    assert all(a["excluded_nodes"][:3] == concat_unit for a in repair["attempts"])
    passed = search.built[repair["passed"]].row
    assert passed.status == "ok"
    convs = _named(model, "Conv")
    assert set(passed.settings["exclude_nodes"]) >= {*concat_unit, convs[0]}  # the outlier's Conv, with the unit


def _score_output(model: onnx.ModelProto, sigmoid: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.name == sigmoid)

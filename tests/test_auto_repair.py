"""The mixed-precision repair's leave-one-out and greedy steps, on a built model with two broken layers.

Latency pruning is off (as in tests/test_auto.py) so what is asserted does not depend on this machine's speed.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import numpy_helper

from optimizer.auto import accuracy_margin
from optimizer.candidates import static_candidate
from tests import models
from tests.test_auto import search_on


def _two_outliers() -> onnx.ModelProto:
    """models.detector's outlier channel in block 1, and a second one in block 3 (same function: Relu
    commutes with a positive scale, and the next Conv divides it back out)."""
    model = models.detector(channels=(8, 16, 16, 16), box_scale=1.0, hidden_outlier=300.0)
    weights = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for name, scale in ((convs[2].input[1], 300.0), (convs[2].input[2], 300.0)):
        array = numpy_helper.to_array(weights[name]).copy()
        array[0] *= scale
        weights[name].CopyFrom(numpy_helper.from_array(array, name))
    array = numpy_helper.to_array(weights[convs[3].input[1]]).copy()
    array[:, 0] /= 300.0
    weights[convs[3].input[1]].CopyFrom(numpy_helper.from_array(array, convs[3].input[1]))
    return model


def test_two_broken_layers_are_found_one_by_one_and_left_in_float_together() -> None:
    model = _two_outliers()
    search = search_on(model)
    target = search._add(static_candidate("minmax", "qdq", "uint8", shared=search.shared))
    assert target.row.status == "rejected"
    search._repair()
    [repair] = search.repairs
    attempts = {a["name"].rsplit("-", 1)[-1]: a for a in repair["attempts"]}
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]

    # each outlier alone in float is not enough, but each brings the margin up
    loo = [a for key, a in attempts.items() if key.startswith("loo")]
    assert len(loo) >= 2 and all(a["status"] == "rejected" for a in loo)
    base = accuracy_margin(target.row.accuracy, search.tolerance)
    helped = [a for a in loo if a["margin"] > base]
    assert {tuple(a["excluded_nodes"]) for a in helped} >= {tuple(convs[0:2]), tuple(convs[2:4])}
    # together they pass: the greedy step combined the two that helped most
    assert repair["passed"].endswith("repair-greedy2")
    assert sorted(attempts["greedy2"]["excluded_nodes"]) == sorted(convs[0:4])
    passed = search.built[repair["passed"]].row
    assert passed.status == "ok" and passed.accuracy["passed"] is True
    # one MinMax calibration served the target and every repair
    assert [c["method"] for c in search.shared.calibrations] == ["minmax"]
    assert search.shared.reused == len(repair["attempts"])
    assert np.isfinite(attempts["greedy2"]["margin"]) and attempts["greedy2"]["margin"] >= 0


def test_a_repair_target_stops_at_its_share_of_the_budget() -> None:
    model = _two_outliers()
    search = search_on(model)
    target = search._add(static_candidate("minmax", "qdq", "uint8", shared=search.shared))
    record = search._repair_one(target.row, time.monotonic())  # its share is already used up
    assert record["attempts"] == [] and record["passed"] is None
    assert {"name": f"{target.row.name}-repair-head", "reason": "the time budget for this repair ran out"} in (
        search.skipped)
    assert list(search.built) == ["fused", target.row.name]  # nothing was built past the share

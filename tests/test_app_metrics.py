"""The `metrics` upload field: a user names the metric that gates an output (optimizer.accuracy.Tolerance.metrics)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import models
from tests.conftest import assert_only_good_serves, npz, post_bad, serving_good_model


@pytest.mark.parametrize(("metrics", "message"), [
    ("logits=top1", "metrics must be a JSON object"),
    ('["logits"]', "metrics must be a JSON object"),
    ('{"logits": "iou"}', "unknown metric 'iou' for output 'logits'"),
    ('{"logits": "mask:x"}', "mask"),
    ('{"scores": "top1"}', "metrics names outputs the model does not have: scores; its outputs are logits"),
])
def test_a_bad_metrics_field_is_a_400_that_says_what_to_fix_and_changes_nothing(data_dir, metrics, message) -> None:  # noqa: ANN001
    with serving_good_model(data_dir) as api:
        response = post_bad(api, models.mlp().SerializeToString(), metrics=metrics)
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]
        assert_only_good_serves(api)


def test_the_named_metric_reaches_the_optimizer_and_gates_that_output(serve) -> None:  # noqa: ANN001
    model = models.mlp()
    samples = np.random.default_rng(1).normal(size=(32, 64)).astype(np.float32)
    with serve() as api:
        accepted = api.upload(model, "mlp.onnx", calibration=npz(features=samples), precision="fp32",
                              metrics=json.dumps({"logits": "top1"}))
        assert accepted.status_code == 202, accepted.text
        job = api.wait(accepted.json()["job_id"])
        assert job["status"] == "succeeded", job
        report = api.client.get("/v1/models/mlp/report").json()["report"]
        assert report["config"]["metrics"] == {"logits": "top1"}
        checked = [out for v in report["variants"] if v.get("accuracy") for out in v["accuracy"]["outputs"].values()]
        assert checked and all(out["metric"] == "top1" for out in checked)

"""A version whose uploaded model cannot run is not served (a defect from last session's notes).

Before: a model that loads but fails on its own declared (fixed) shapes failed its job, yet its original still served
when no other version was ready: /v1/models said it served, and every predict got 400 with ONNX Runtime's error, as if
the client's inputs were wrong. Now such a version is never served: predict gets 409 naming the version, its job's
failure and what to do; an older version keeps serving; a model whose optimization merely failed (its original runs)
still serves its original. Real app (TestClient), real worker, real ONNX Runtime, real SQLite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from sqlalchemy import create_engine, text

from app.worker.runner import RunSpec, run
from tests import models
from tests.conftest import Api
from tests.test_errors_library import broken_conv, impossible_reshape
from tests.test_review_registry import _reflect_pad

BROKEN_FEED = {"x": np.ones((1, 3, 8, 8), np.float32)}  # the broken model's own declared shape
REASON = "C: 3 kernel channels: 5"  # what ONNX Runtime says about broken_conv, in the job's error


def _listed(api: Api, name: str) -> dict[str, Any]:
    return next(m for m in api.client.get("/v1/models").json() if m["name"] == name)


def _version(api: Api, name: str, version: int) -> dict[str, Any]:
    answer = api.client.get(f"/v1/models/{name}/versions/{version}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def _upload_and_wait(api: Api, model: onnx.ModelProto, name: str, **fields: str) -> dict[str, Any]:
    accepted = api.upload(model, name=name, **fields)
    assert accepted.status_code == 202, accepted.text
    return api.wait(accepted.json()["job_id"])


def _assert_not_served(answer, version: int) -> None:  # noqa: ANN001 - httpx.Response
    """409 (not a 400 blaming the client's inputs), naming the version, why its job failed and what to do."""
    assert answer.status_code == 409, answer.text
    error = answer.json()["error"]
    assert f"version {version} is not served: its job failed because ONNX Runtime cannot run" in error, error
    assert REASON in error and "Upload a fixed model" in error and "pin another version" in error, error


def _assert_broken_only(api: Api) -> None:
    """`broken` (its one version unrunnable) is listed as failed and serving nothing; every way in says why."""
    listed = _listed(api, "broken")
    assert (listed["serving_version"], listed["serving_variant"], listed["latest_status"]) == (None, None, "failed")
    described = api.client.get("/v1/models/broken").json()
    assert described["serving_version"] is None, described
    version = _version(api, "broken", 1)
    assert version["status"] == "failed" and REASON in version["error"] and version["servable"] is False, version
    _assert_not_served(api.predict("broken", BROKEN_FEED), 1)  # was 400 with ONNX Runtime's error
    _assert_not_served(api.predict("broken", BROKEN_FEED, version=1), 1)
    _assert_not_served(api.predict("broken", BROKEN_FEED, variant="original"), 1)
    _assert_not_served(api.client.get("/v1/models/broken/report"), 1)
    _assert_not_served(api.client.put("/v1/models/broken/serving", json={"version": 1}), 1)
    infer = api.client.post("/v2/models/broken/infer", json={"inputs": [
        {"name": "x", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [1.0] * 192}]})
    _assert_not_served(infer, 1)
    assert api.client.get("/v2/models/broken/ready").status_code == 503  # was 200: "ready" to fail every request


def _fixed_cnn() -> onnx.ModelProto:
    """A CNN with its batch dimension fixed to 1: no input has a dynamic dimension, and it runs. Large enough (~10 ms
    a run) that its job cannot finish within 0.5 s: models.cnn()'s default size did on a quiet machine."""
    model = models.cnn(channels=(32, 64, 128), image=128)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    return model


def test_a_model_that_cannot_run_on_its_own_shapes_is_not_served_even_after_a_restart(serve) -> None:  # noqa: ANN001
    with serve() as api:
        job = _upload_and_wait(api, broken_conv(), "broken")
        assert job["status"] == "failed" and REASON in job["error"], job
        _assert_broken_only(api)
    with serve(run_worker=False) as api:  # a new app on the same data folder
        _assert_broken_only(api)


def test_an_older_version_keeps_serving_and_a_fixed_upload_takes_over(serve) -> None:  # noqa: ANN001
    mlp_feed = models.random_feed(models.mlp(), batch=1)
    with serve() as api:
        assert _upload_and_wait(api, models.mlp(), "m", precision="fp32")["status"] == "succeeded"
        assert _upload_and_wait(api, broken_conv(), "m")["status"] == "failed"
        served = api.predict("m", mlp_feed)
        assert served.status_code == 200 and served.json()["version"] == 1, served.text
        assert _listed(api, "m")["serving_version"] == 1
        _assert_not_served(api.predict("m", BROKEN_FEED, version=2), 2)  # was 400 with ONNX Runtime's error
        assert api.client.put("/v1/models/m/serving", json={"version": 1}).status_code == 200  # a pin still works
        assert api.client.delete("/v1/models/m/serving").status_code == 200
        # A broken first version, then a fixed one: the fixed one serves (its original at once, while it optimizes).
        assert _upload_and_wait(api, broken_conv(), "n")["status"] == "failed"
        accepted = api.upload(models.mlp(), name="n", precision="fp32").json()
        served = api.predict("n", mlp_feed)
        assert served.status_code == 200 and served.json()["version"] == 2, served.text
        assert api.wait(accepted["job_id"])["status"] == "succeeded"
        assert api.predict("n", mlp_feed).json()["version"] == 2


def test_a_model_whose_optimization_failed_but_that_runs_still_serves_its_original(serve) -> None:  # noqa: ANN001
    x = np.arange(320, dtype=np.float32).reshape(1, 320)
    with serve() as api:
        # Its optimizer cannot run it on generated inputs (a dynamic dimension, too short): real inputs run.
        job = _upload_and_wait(api, _reflect_pad(), "pad")
        assert job["status"] == "failed" and "generated" in job["error"], job
        served = api.predict("pad", {"x": x})
        assert served.status_code == 200 and served.json()["variant"] == "original", served.text
    with serve(job_time_limit_s=0.5) as api:
        # A fixed-shape model whose job ran out of time: nothing says it cannot run.
        job = _upload_and_wait(api, _fixed_cnn(), "slow")
        assert job["status"] == "failed" and "time limit" in job["error"], job
        feed = {"image": np.ones((1, 3, 128, 128), np.float32)}
        served = api.predict("slow", feed)
        assert served.status_code == 200 and served.json()["variant"] == "original", served.text
        assert api.client.put("/v1/models/slow/serving", json={"version": 1}).status_code == 200
        assert _listed(api, "slow")["serving_version"] == 1
        assert _version(api, "slow", 1)["servable"] is True


def test_the_runner_says_unrunnable_only_when_the_model_fails_on_its_own_fixed_shapes(tmp_path: Path) -> None:
    said = {}
    for name, model in (("fixed", broken_conv()), ("dynamic", impossible_reshape()), ("ids", _small_table())):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        messages: list[list] = []
        run(RunSpec(str(path), str(tmp_path / name), config={"precision": "fp32", "time_budget_s": 10.0,
                                                               "threads": 1}), messages.append)
        said[name] = messages[-1]
    assert said["fixed"][0] == "error" and said["fixed"][2:] == ["unrunnable"], said
    assert said["dynamic"][0] == "error" and len(said["dynamic"]) == 2, said  # real inputs may run it
    # Fixed shapes but integer ids: generated ids (0-9) overflow its 5-row table; real ids (0-4) run it.
    assert said["ids"][0] == "error" and len(said["ids"]) == 2 and "calibration" in said["ids"][1], said


def _small_table() -> onnx.ModelProto:
    """A fixed-shape [1, 4] int64 input gathered from a 5-row embedding table: only ids 0-4 are valid."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(15, dtype=np.float32).reshape(5, 3), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "ids",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_data_folder_made_before_the_column_keeps_serving_and_learns_it(serve, data_dir: Path) -> None:  # noqa: ANN001
    mlp_feed = models.random_feed(models.mlp(), batch=1)
    with serve() as api:
        assert _upload_and_wait(api, models.mlp(), "m", precision="fp32")["status"] == "succeeded"
        assert _upload_and_wait(api, _reflect_pad(), "pad")["status"] == "failed"
    engine = create_engine(f"sqlite:///{(data_dir / 'onnxforge.db').resolve()}")
    with engine.begin() as connection:  # the schema of the code before this column: today's without it
        connection.execute(text("ALTER TABLE model_versions DROP COLUMN unrunnable"))
    engine.dispose()
    with serve() as api:  # the app's start-up adds the column; the old rows (NULL) serve as before
        assert api.predict("m", mlp_feed).json()["version"] == 1
        served = api.predict("pad", {"x": np.ones((1, 320), np.float32)})
        assert served.status_code == 200 and served.json()["variant"] == "original", served.text
        assert _upload_and_wait(api, broken_conv(), "m")["status"] == "failed"
        assert api.predict("m", mlp_feed).json()["version"] == 1
        _assert_not_served(api.predict("m", BROKEN_FEED, version=2), 2)

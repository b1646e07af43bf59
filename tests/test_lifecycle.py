"""Model lifecycle (H8, from a user review): which version serves while newer ones optimize or fail, pinning a version
to serve (rollback) on every replica and across schema upgrades, why a model that asked for batching gets none, and
predict's misplaced query parameters. Real app (TestClient), real worker, real ONNX Runtime, real databases."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper
from sqlalchemy import create_engine, inspect, text

from app.main import create_app
from app.settings import Settings
from app.store import Base, Database
from tests import hostile, models
from tests.conftest import TEST_SETTINGS, Api
from tests.test_review_registry import _reflect_pad

ADMIN_KEY = "admin-key-0123456789abcdef"
READ_KEY = "read-key-0123456789abcdef"


def _described(api: Api, name: str) -> dict[str, Any]:
    response = api.client.get(f"/v1/models/{name}")
    assert response.status_code == 200, response.text
    return response.json()


def _listed(api: Api, name: str) -> dict[str, Any]:
    return next(m for m in api.client.get("/v1/models").json() if m["name"] == name)


def _ready(api: Api, model: onnx.ModelProto, name: str) -> int:
    """Upload `model` as `name` (FP32: the optimizer's choice does not matter here) and wait until it is ready."""
    accepted = api.upload(model, name=name, precision="fp32").json()
    assert api.wait(accepted["job_id"])["status"] == "succeeded"
    return accepted["version"]


# -- 1. a version that serves keeps serving until a newer one is ready --------------------------------------------


def test_a_new_upload_still_queued_does_not_take_the_name_from_the_one_serving(serve) -> None:  # noqa: ANN001
    mlp_feed = models.random_feed(models.mlp(), batch=1)
    cnn_feed = models.random_feed(models.cnn(), batch=1)
    with serve(run_worker=False) as api:  # no worker: both jobs stay queued, neither version is ever ready
        assert api.upload(models.mlp(), name="m").status_code == 202
        second = api.upload(models.cnn(), name="m")
        assert second.status_code == 202
        assert "version 1, which serves now" in second.json()["warnings"][0]

        served = api.predict("m", mlp_feed)
        assert served.status_code == 200, served.text  # was 400 "unknown input": version 2 served at once
        assert (served.json()["version"], served.json()["variant"]) == (1, "original")
        assert api.predict("m", cnn_feed).status_code == 400
        assert api.predict("m", cnn_feed, version=2).status_code == 200  # the new one, asked for by number
        assert (_described(api, "m")["serving_version"], _listed(api, "m")["serving_version"]) == (1, 1)
        assert [i["name"] for i in _described(api, "m")["inputs"]] == ["features"]
        assert api.client.get("/v2/models/m").json()["inputs"][0]["name"] == "features"


def test_failed_and_optimizing_versions_never_replace_the_serving_one_a_ready_one_does(serve) -> None:  # noqa: ANN001
    signal = {"x": np.ones((1, 320), np.float32)}
    with serve(job_time_limit_s=2.0) as api:
        first = api.upload(_reflect_pad(), name="m").json()["job_id"]
        assert api.wait(first)["status"] == "failed"  # its optimizer cannot run it: its original serves
        hangs = api.upload(hostile.model_that_hangs(), name="m").json()["job_id"]
        api.wait(hangs, until=lambda job: job["status"] == "running")
        assert _described(api, "m")["serving_version"] == 1  # was 2: an optimizing version beat a failed one
        served = api.predict("m", signal)
        assert served.status_code == 200, served.text
        assert (served.json()["version"], served.json()["variant"]) == (1, "original")
        assert api.wait(hangs)["status"] == "failed"  # over the job time limit
        assert _described(api, "m")["serving_version"] == 1  # was 2: the newest failed version
        assert api.predict("m", signal).json()["version"] == 1
    with serve() as api:
        assert _ready(api, models.mlp(), "m") == 3
        assert (_described(api, "m")["serving_version"], _listed(api, "m")["serving_version"]) == (3, 3)
        assert api.predict("m", models.random_feed(models.mlp(), batch=1)).json()["version"] == 3


# -- 2. rollback: pin a version ---------------------------------------------------------------------------------


def test_pin_an_older_version_unpin_and_what_cannot_be_pinned_or_deleted(serve) -> None:  # noqa: ANN001
    feed = models.random_feed(models.mlp(), batch=1)
    with serve() as api:
        assert (_ready(api, models.mlp(seed=1), "m"), _ready(api, models.mlp(seed=2), "m")) == (1, 2)
        assert _described(api, "m")["pinned_version"] is None
        pinned = api.client.put("/v1/models/m/serving", json={"version": 1})
        assert pinned.status_code == 200, pinned.text
        assert pinned.json() == {"name": "m", "serving_version": 1, "pinned_version": 1}
        assert api.predict("m", feed).json()["version"] == 1
        described = _described(api, "m")
        assert (described["serving_version"], described["pinned_version"]) == (1, 1)
        assert (_listed(api, "m")["serving_version"], _listed(api, "m")["pinned_version"]) == (1, 1)
        assert api.client.get("/v1/models/m/report").json()["version"] == 1

        assert _ready(api, models.mlp(seed=3), "m") == 3  # a newer ready version does not override a pin
        assert api.predict("m", feed).json()["version"] == 1

        refused = api.client.delete("/v1/models/m/versions/1")
        assert refused.status_code == 409 and "unpin" in refused.json()["error"], refused.text
        assert api.predict("m", feed, version=1).status_code == 200  # refused: nothing was deleted
        missing = api.client.put("/v1/models/m/serving", json={"version": 9})
        assert missing.status_code == 404 and "no version 9" in missing.json()["error"]
        assert api.client.delete("/v1/models/m/versions/2").status_code == 200
        deleted = api.client.put("/v1/models/m/serving", json={"version": 2})
        assert deleted.status_code == 404 and "[1, 3]" in deleted.json()["error"], deleted.text
        assert api.client.put("/v1/models/m/serving", json={"version": 0}).status_code == 422
        assert api.client.put("/v1/models/nope/serving", json={"version": 1}).status_code == 404

        unpinned = api.client.delete("/v1/models/m/serving")
        assert unpinned.json() == {"name": "m", "serving_version": 3, "pinned_version": None}
        assert api.predict("m", feed).json()["version"] == 3
        assert api.client.delete("/v1/models/m/serving").status_code == 200  # nothing to unpin: not an error
        assert api.client.delete("/v1/models/m/versions/1").status_code == 200
        assert api.client.put("/v1/models/m/serving", json={"version": 3}).status_code == 200
        assert api.client.delete("/v1/models/m").status_code == 200  # the whole model goes, its pin with it
        assert api.client.get("/v1/models/m").status_code == 404


def test_a_version_still_optimizing_cannot_be_pinned(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(models.mlp(), name="m").status_code == 202
        refused = api.client.put("/v1/models/m/serving", json={"version": 1})
        assert refused.status_code == 409 and "still optimizing" in refused.json()["error"]
        assert _described(api, "m")["pinned_version"] is None


def test_a_failed_version_pinned_serves_its_original(serve) -> None:  # noqa: ANN001
    with serve() as api:
        assert _ready(api, models.mlp(), "m") == 1
        failed = api.upload(_reflect_pad(), name="m").json()["job_id"]
        assert api.wait(failed)["status"] == "failed"
        assert _described(api, "m")["serving_version"] == 1
        assert api.client.put("/v1/models/m/serving", json={"version": 2}).json()["serving_version"] == 2
        served = api.predict("m", {"x": np.ones((1, 320), np.float32)})
        assert served.status_code == 200, served.text
        assert (served.json()["version"], served.json()["variant"]) == (2, "original")


def test_pinning_needs_an_admin_key(serve) -> None:  # noqa: ANN001
    with serve(api_keys=f"admin:{ADMIN_KEY},read:{READ_KEY}") as api:
        admin, read = ({"authorization": f"Bearer {key}"} for key in (ADMIN_KEY, READ_KEY))
        accepted = api.client.post("/v1/models", headers=admin, data={"name": "m", "precision": "fp32"},
                                   files={"file": ("m.onnx", models.mlp().SerializeToString())}).json()
        api.client.headers.update(read)
        assert api.wait(accepted["job_id"])["status"] == "succeeded"
        assert api.client.put("/v1/models/m/serving", json={"version": 1}).status_code == 403
        assert api.client.delete("/v1/models/m/serving").status_code == 403
        assert api.client.put("/v1/models/m/serving", json={"version": 1}, headers=admin).status_code == 200
        assert api.client.delete("/v1/models/m/serving", headers=admin).status_code == 200


def test_a_pin_through_one_replica_is_honoured_by_another(serve, data_dir) -> None:  # noqa: ANN001
    feed = models.random_feed(models.mlp(), batch=1)
    with serve() as api:
        assert (_ready(api, models.mlp(seed=1), "m"), _ready(api, models.mlp(seed=2), "m")) == (1, 2)
        # A second replica on the same database and artifacts, caching which version serves as in production.
        other = Settings(**{**TEST_SETTINGS, "data_dir": data_dir, "run_worker": False, "registry_cache_ttl_s": 1.0})
        with TestClient(create_app(other)) as client:
            replica = Api(client)
            assert replica.predict("m", feed).json()["version"] == 2  # cached now
            assert api.client.put("/v1/models/m/serving", json={"version": 1}).status_code == 200
            _until(lambda: replica.predict("m", feed).json()["version"] == 1, "the replica serves the pinned version")
            assert _described(replica, "m")["pinned_version"] == 1
            assert api.client.delete("/v1/models/m/serving").status_code == 200
            _until(lambda: replica.predict("m", feed).json()["version"] == 2, "the replica follows the unpin")


def _until(condition, what: str, timeout: float = 10.0) -> None:  # noqa: ANN001 - a callable
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_a_data_folder_of_the_previous_release_gets_the_pin_column(serve, data_dir) -> None:  # noqa: ANN001
    data_dir.mkdir(parents=True)
    url = f"sqlite:///{(data_dir / 'onnxforge.db').resolve()}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:  # the previous release's schema: today's without pinned_at
        connection.execute(text("ALTER TABLE model_versions DROP COLUMN pinned_at"))
    engine.dispose()
    with serve() as api:  # the app's start-up adds the column
        assert _ready(api, models.mlp(), "m") == 1
        assert _ready(api, models.mlp(seed=1), "m") == 2
        assert api.client.put("/v1/models/m/serving", json={"version": 1}).json()["serving_version"] == 1
        assert api.predict("m", models.random_feed(models.mlp(), batch=1)).json()["version"] == 1


def test_pinning_on_postgresql_and_its_previous_release_schema(serve, new_database) -> None:  # noqa: ANN001
    url = new_database()
    database = Database(url)
    Base.metadata.create_all(database.engine)
    with database.engine.begin() as connection:
        connection.execute(text("ALTER TABLE model_versions DROP COLUMN pinned_at"))
    database.dispose()
    with serve(database_url=url) as api:
        columns = {c["name"]: c for c in inspect(api.services.db.engine).get_columns("model_versions")}
        assert columns["pinned_at"]["nullable"]
        assert (_ready(api, models.mlp(seed=1), "m"), _ready(api, models.mlp(seed=2), "m")) == (1, 2)
        assert api.client.put("/v1/models/m/serving", json={"version": 1}).json()["pinned_version"] == 1
        assert api.predict("m", models.random_feed(models.mlp(), batch=1)).json()["version"] == 1
        assert api.client.delete("/v1/models/m/versions/1").status_code == 409
        assert api.client.delete("/v1/models/m/serving").json()["serving_version"] == 2


# -- 3. a model that asked for batching and gets none says why ---------------------------------------------------


def _vad_like() -> onnx.ModelProto:
    """Like Silero VAD's If-less export: audio x[batch, n], a scalar sample rate `sr`, a recurrent state batched on
    axis 1 ([2, batch, 8]): no common first axis to stack requests on."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1], keepdims=1),
         helper.make_node("Cast", ["sr"], ["rate"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["mean", "rate"], ["prob"]),
         helper.make_node("Identity", ["state"], ["stateN"])],
        "vad_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, []),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_a_forced_batch_size_on_a_model_that_cannot_batch_says_why(serve) -> None:  # noqa: ANN001
    feed = {"x": np.ones((1, 64), np.float32), "sr": np.array(16000, np.int64),
            "state": np.zeros((2, 1, 8), np.float32)}
    with serve(run_worker=False) as api:
        assert api.upload(_vad_like(), name="vad", batch_max_size="16").status_code == 202
        assert api.upload(_vad_like(), name="plain").status_code == 202  # asked for nothing: nothing to say
        for name in ("vad", "plain"):
            answer = api.predict(name, feed)
            assert answer.status_code == 200, answer.text
        described = _described(api, "vad")
        assert described["versions"][0]["batching"] == {"batch_max_size": 16}
        note = described["batching_note"]
        assert note is not None and "never batched" in note and "'sr'" in note and "scalar" in note, note
        assert _described(api, "plain")["batching_note"] is None


# -- 4. ?variant= on predict is refused, naming the body field -----------------------------------------------------


@pytest.mark.parametrize("stack", ["framework", "fast"])
def test_predict_refuses_variant_and_version_as_query_parameters(serve, stack: str) -> None:  # noqa: ANN001
    feed = models.random_feed(models.mlp(), batch=1)
    overrides = {"cors_origins": "http://example.test"} if stack == "framework" else {}  # CORS on: no fast path
    with serve(run_worker=False, **overrides) as api:
        assert api.upload(models.mlp(), name="m").status_code == 202
        inputs = {k: v.tolist() for k, v in feed.items()}
        for path, query in (("/v1/models/m/predict", "variant=optimized"),
                            ("/v1/models/m/versions/1/predict", "variant=original"),
                            ("/v1/models/m/predict", "version=1")):
            refused = api.client.post(f"{path}?{query}", json={"inputs": inputs})
            assert refused.status_code == 400, refused.text
            key = query.split("=")[0]
            assert f"no '{key}' query parameter" in refused.json()["error"]
        assert "body" in api.client.post("/v1/models/m/predict?variant=x", json={"inputs": inputs}).json()["error"]
        assert api.client.post("/v1/models/m/predict?other=1", json={"inputs": inputs}).status_code == 200
        assert api.predict("m", feed, variant="original").status_code == 200

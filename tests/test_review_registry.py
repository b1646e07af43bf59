"""Registry, worker, API and CLI findings of a user review (H4's findings 4, 5, 6, 7, 9, 10), each pinned by a test
that failed before its fix. Real app (TestClient), real worker, real ONNX Runtime, real CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from app.cli import main
from optimizer.runtime import create_session
from tests import hostile, models


def _reflect_pad(pad: int = 300) -> onnx.ModelProto:
    """y = Pad(x, reflect, `pad` each side of axis 1), x[1, n]: runs for n > `pad`, fails on shorter inputs.

    Like Silero VAD (its STFT reflect-pads the audio by 32-64), but more: the optimizer's generated inputs give dynamic
    dims 8 values, then 256 on its second tries (optimizer.pipeline.GENERATED_RETRIES), too short, so its run of the
    original fails in ONNX Runtime; a client sending real (longer) inputs is served.
    """
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, pad, 0, pad])
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")], "reflect_pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])], [pads],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


# -- 4. a version whose optimization fails keeps serving its validated original ---------------------------------


def test_a_failed_optimization_keeps_the_original_serving_and_says_what_to_do(serve) -> None:  # noqa: ANN001
    model = _reflect_pad()
    x = np.arange(320, dtype=np.float32).reshape(1, 320)
    expected = create_session(model.SerializeToString()).run(None, {"x": x})[0]
    with serve() as api:
        job = api.wait(api.upload(model, name="pad").json()["job_id"])
        assert job["status"] == "failed"
        error = job["error"]
        assert "generated" in error and "calibration samples" in error and "Pad reflect" in error, error
        assert "\n" not in error and "unexpectedly" not in error, error

        answer = api.predict("pad", {"x": x})
        assert answer.status_code == 200, answer.text
        assert (answer.json()["version"], answer.json()["variant"]) == (1, "original")
        np.testing.assert_array_equal(np.asarray(answer.json()["outputs"]["y"], dtype=np.float32), expected)
        assert api.predict("pad", {"x": x}, version=1).json()["variant"] == "original"

        refused = api.predict("pad", {"x": x}, variant="optimized")
        assert refused.status_code == 409
        assert "optimization failed" in refused.json()["error"] and "original" in refused.json()["error"]
        download = api.client.get("/v1/models/pad/artifact", params={"variant": "optimized"})
        assert download.status_code == 409

        described = api.client.get("/v1/models/pad").json()
        assert (described["serving_version"], described["serving_variant"]) == (1, "original")
        assert (described["versions"][0]["status"], described["versions"][0]["error"]) == ("failed", error)
        report = api.client.get("/v1/models/pad/report")
        assert report.status_code == 409 and "optimization failed" in report.json()["error"]
        assert api.client.get("/v2/models/pad").json()["versions"] == ["1"]
        assert api.client.get("/v2/models/pad/ready").status_code == 200


def test_a_failed_version_never_replaces_a_ready_one_and_serves_once_that_is_deleted(serve) -> None:  # noqa: ANN001
    feed = models.random_feed(models.mlp(), batch=1)
    with serve() as api:
        assert api.wait(api.upload(models.mlp(seed=1), name="m").json()["job_id"])["status"] == "succeeded"
        second = api.upload(_reflect_pad(), name="m").json()["job_id"]
        assert api.wait(second)["status"] == "failed"
        assert api.predict("m", feed).json()["version"] == 1
        assert api.client.delete("/v1/models/m/versions/1").status_code == 200
        answer = api.predict("m", {"x": np.ones((1, 320), np.float32)})
        assert answer.status_code == 200, answer.text
        assert (answer.json()["version"], answer.json()["variant"]) == (2, "original")


def test_cli_optimize_on_generated_inputs_the_model_refuses_prints_one_error_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pad.onnx"
    onnx.save(_reflect_pad(), path)
    code = main(["optimize", str(path), "--out", str(tmp_path / "out"), "--precision", "int8", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--calibration" in lines[0] and "Pad reflect" in lines[0], err
    assert not (tmp_path / "out").exists()


# -- 6. where the optimizer kept the original, "optimized" downloads are the uploaded bytes ----------------------


def test_optimized_download_of_a_kept_original_is_the_uploaded_file(serve) -> None:  # noqa: ANN001
    uploaded = models.mlp().SerializeToString()
    with serve(optimize_time_budget_s=0.001) as api:  # no candidate fits the budget: the original is kept
        assert api.wait(api.upload(uploaded, name="kept").json()["job_id"])["status"] == "succeeded"
        described = api.client.get("/v1/models/kept").json()["versions"][0]
        assert described["selected"] == "original"
        report = api.client.get("/v1/models/kept/report").json()["report"]
        download = api.client.get("/v1/models/kept/artifact", params={"variant": "optimized"})
        assert download.status_code == 200
        digest = hashlib.sha256(download.content).hexdigest()
        assert digest == described["sha256"] == report["source"]["sha256"]
        assert download.content == uploaded
        assert "kept-v1-original.onnx" in download.headers["content-disposition"]
        base = next(v for v in report["variants"] if v["name"] == "original")
        assert base["size_bytes"] == len(uploaded) == report["source"]["size_bytes"]
        assert report["size_ratio"] == 1.0
        stored = {p.name for p in (api.services.settings.artifacts_dir / "models/kept/1").iterdir()}
        assert "optimized.onnx" not in stored


# -- 5. a new version with a different interface is accepted with a warning ---------------------------------------


def test_a_new_interface_is_accepted_with_a_warning_naming_the_difference(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        first = api.upload(models.mlp(features=8), name="m")
        assert first.status_code == 202 and first.json()["warnings"] == []
        same = api.upload(models.mlp(features=8, seed=1), name="m")
        assert same.status_code == 202 and same.json()["warnings"] == []
        changed = api.upload(models.cnn(), name="m")
        assert changed.status_code == 202
        warnings = changed.json()["warnings"]
        assert len(warnings) == 1
        assert "version 1, which serves now" in warnings[0]  # v2 is still queued: v1 serves until one is ready
        assert "input 'features' is gone" in warnings[0] and "input 'image' is new" in warnings[0]
        assert "400" in warnings[0]
        versions = api.client.get("/v1/models/m").json()["versions"]
        assert warnings[0] in versions[2]["notes"] and not any("warning" in n for n in versions[1]["notes"])
        typed = api.upload(_reflect_pad(), name="p").json()["warnings"]
        assert typed == []
        wider = helper.make_model(helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, "n", 2])],
            [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, "n", 2])]),
            opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        text = api.upload(wider, name="p").json()["warnings"][0]
        assert "input 'x' was float32, is float64" in text and "input 'x' had rank 2, has 3" in text
        assert "output 'y' was float32, is float64" in text


# -- 9. cosmetics: queued status, a re-run job's stale error, batching as ints ------------------------------------


def test_a_queued_version_says_queued(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        assert api.upload(models.mlp(), name="q", batch_max_size="8").status_code == 202
        listed = api.client.get("/v1/models").json()
        assert listed[0]["latest_status"] == "queued"
        report = api.client.get("/v1/models/q/report")
        assert report.status_code == 409 and "queued" in report.json()["error"]
        assert "running" not in report.json()["error"]
        described = api.client.get("/v1/models/q")
        assert '"batching":{"batch_max_size":8}' in described.text
        assert described.json()["versions"][0]["batching"]["batch_max_size"] == 8


def test_a_job_running_again_after_a_shutdown_drops_the_interrupted_error(serve) -> None:  # noqa: ANN001
    with serve() as api:
        job_id = api.upload(hostile.model_that_hangs(), name="h").json()["job_id"]
        api.wait(job_id, until=lambda job: job["status"] == "running")
    with serve(run_worker=False) as api:
        assert "interrupted" in api.job(job_id)["error"]
    with serve() as api:
        job = api.wait(job_id, until=lambda job: job["status"] == "running")
        assert job["error"] is None and job["attempts"] == 1, job
        listed = api.client.get("/v1/models").json()
        assert listed[0]["latest_status"] == "optimizing"


# -- 10. the raw /v2 infer routes are in the OpenAPI document ------------------------------------------------------


def test_v2_infer_routes_are_documented(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        paths = api.client.get("/openapi.json").json()["paths"]
        for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
            assert "post" in paths[path], sorted(paths)
            operation = paths[path]["post"]
            assert {p["name"] for p in operation["parameters"]} >= {"name"}
            assert "application/json" in operation["requestBody"]["content"]
            assert "application/octet-stream" in operation["requestBody"]["content"]
        assert api.upload(models.mlp(), name="m").status_code == 202
        feed = models.random_feed(models.mlp(), batch=1)["features"]
        body = {"inputs": [{"name": "features", "shape": list(feed.shape), "datatype": "FP32",
                            "data": feed.ravel().tolist()}]}
        answer = api.client.post("/v2/models/m/infer", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["name"] == "logits"

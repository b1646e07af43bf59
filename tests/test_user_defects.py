"""Defects a user of the service or the CLI would hit (H3), each pinned by a test that failed before its fix.

Real app (TestClient), real ONNX Runtime, real CLI. Where a test needs a state the worker reaches only by
chance (the optimizer keeping the original) or that only an older release could write (a model stored before
an upload check existed), it writes that state through the same store and queue calls the worker and the
registry make, not with mocks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from fastapi.testclient import TestClient

from app.cli import main
from app.main import create_app
from app.settings import Settings
from app.storage.base import OPTIMIZED, ORIGINAL, artifact_key
from app.store import Job, ModelVersion
from optimizer.runtime import create_session
from tests import models
from tests.conftest import TEST_SETTINGS, Api, files_under


def _finish_job(api: Api, selected: str, tmp: Path) -> None:
    """Finish the oldest queued job as the worker does when the optimizer selected `selected`: its optimized file
    stored, the version ready. With `selected` "original" the pipeline writes the original model as model.onnx."""
    services = api.services
    job = services.jobs.claim("test-worker")
    assert job is not None
    written = tmp / f"{job.name}-{job.version}.onnx"
    shutil.copyfile(services.store.fetch(artifact_key(job.name, job.version, ORIGINAL)), written)
    services.store.put_file(artifact_key(job.name, job.version, OPTIMIZED), written, move=True)
    report = {"baseline": "original", "selected": selected, "provider": "cpu"}
    assert services.jobs.succeed(job, "test-worker", report=report, selected=selected, provider="cpu")


# -- 1. the variant a predict answer names is the one that serves -------------------------------------------


def test_a_version_whose_optimizer_kept_the_original_says_original(serve, tmp_path: Path) -> None:  # noqa: ANN001
    """Was: "variant": "optimized" in every answer (and serving_variant in the model's JSON) although the optimizer
    had found nothing faster than the original and served it: a user read that they got a speedup."""
    kept, fused = models.mlp(seed=1), models.mlp(seed=2)
    feed = models.random_feed(kept, batch=2)
    with serve(run_worker=False) as api:
        assert api.upload(kept, name="kept").status_code == 202
        _finish_job(api, "original", tmp_path)
        assert api.upload(fused, name="fused").status_code == 202
        _finish_job(api, "fused", tmp_path)

        expected = create_session(kept.SerializeToString()).run(None, feed)[0]
        for version, extra in ((None, {}), (None, {"variant": "optimized"}), (1, {}), (1, {"variant": "original"})):
            answer = api.predict("kept", feed, version=version, **extra)
            assert answer.status_code == 200, answer.text
            assert (answer.json()["version"], answer.json()["variant"]) == (1, "original")
            np.testing.assert_allclose(np.asarray(answer.json()["outputs"]["logits"]), expected, rtol=1e-5, atol=1e-5)
        described = api.client.get("/v1/models/kept").json()
        assert (described["serving_version"], described["serving_variant"]) == (1, "original")
        assert described["versions"][0]["selected"] == "original"
        listed = {m["name"]: m["serving_variant"] for m in api.client.get("/v1/models").json()}
        assert listed == {"kept": "original", "fused": "optimized"}
        download = api.client.get("/v1/models/kept/artifact")
        assert download.status_code == 200 and "kept-v1-original.onnx" in download.headers["content-disposition"]
        onnx.checker.check_model(onnx.load_from_string(download.content))

        # A version where a recipe won still says optimized, and the original stays one request away.
        assert api.predict("fused", feed).json()["variant"] == "optimized"
        assert api.predict("fused", feed, variant="original").json()["variant"] == "original"


# -- 2. a stored model whose outputs are not all tensors --------------------------------------------------


def _store_as_an_older_release(api: Api, name: str, model: onnx.ModelProto, tmp: Path) -> None:
    """What releases before the tensor-output check (optimizer.loading.require_tensor_outputs) stored for an
    upload they accepted: the version row, its job and the original file."""
    services = api.services
    source = tmp / f"{name}.onnx"
    source.write_bytes(model.SerializeToString())
    with services.db.write() as session:
        version = ModelVersion(name=name, version=1, status="optimizing", filename=source.name, sha256="0" * 64,
                               size_bytes=source.stat().st_size, options={}, inputs=[], outputs=[], notes=[])
        session.add(version)
        session.flush()
        session.add(Job(version_id=version.id, name=name, version=1))
    services.store.put_file(artifact_key(name, 1, ORIGINAL), source)


def test_a_stored_model_with_a_map_output_answers_predict_with_a_conflict_not_500(serve, tmp_path: Path) -> None:  # noqa: ANN001
    """Was: 500 on /v1 predict (orjson: 'Dict key must be str') and on /v2 infer, for every request. Now a 409
    naming the output and the fix; /v2 may still ask for the tensor outputs alone, and gets them."""
    feed = {"x": [[0.1, 2.0, 0.3], [3.0, 0.2, 0.1]]}
    with serve(run_worker=False) as api:
        _store_as_an_older_release(api, "clf", models.zipmap_classifier(), tmp_path)
        for path in ("/v1/models/clf/predict", "/v1/models/clf/versions/1/predict"):
            answer = api.client.post(path, json={"inputs": feed})
            assert answer.status_code == 409, answer.text
            error = answer.json()["error"]
            assert "'probabilities'" in error and "zipmap=False" in error and "'label'" not in error
        infer = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": sum(feed["x"], [])}]}
        answer = api.client.post("/v2/models/clf/infer", json=infer)
        assert answer.status_code == 409 and "'probabilities'" in answer.json()["error"], answer.text
        label_only = api.client.post("/v2/models/clf/infer", json={**infer, "outputs": [{"name": "label"}]})
        assert label_only.status_code == 200, label_only.text
        assert label_only.json()["outputs"][0]["data"] == [1, 0]
        described = api.client.get("/v1/models/clf")
        assert described.status_code == 200, described.text
        assert [o["name"] for o in described.json()["outputs"]] == ["label", "probabilities"]
        assert api.client.get("/v2/models/clf").status_code == 200


# -- 3. deleting a model removes its folder ---------------------------------------------------------------


def test_deleting_a_model_removes_its_folder_and_nothing_of_another(serve) -> None:  # noqa: ANN001
    """Was: `models/<name>/` stayed behind, empty, after the model's last version was deleted."""
    with serve(run_worker=False) as api:
        for name in ("a", "a", "ab"):  # "ab" shares the prefix "a": its files must survive a's delete
            assert api.upload(models.mlp(), name=name).status_code == 202
        root = api.services.settings.artifacts_dir / "models"
        assert api.client.delete("/v1/models/a/versions/1").status_code == 200
        assert files_under(root) == {"a/2/original.onnx", "ab/1/original.onnx"}
        assert sorted(p.name for p in (root / "a").iterdir()) == ["2"]
        assert api.client.delete("/v1/models/a").status_code == 200
        assert files_under(root) == {"ab/1/original.onnx"}
        assert sorted(p.name for p in root.iterdir()) == ["ab"]
        assert api.predict("ab", models.random_feed(models.mlp())).status_code == 200
        assert api.client.delete("/v1/models/ab").status_code == 200
        assert api.upload(models.mlp(), name="a").status_code == 202  # a name comes back: version 3, stored
        assert files_under(root) == {"a/3/original.onnx"}


# -- 4. `onnxforge optimize` refused: no empty --out folder left ---------------------------------------------


def test_a_refused_optimize_leaves_no_folder_it_made(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Was: --out (and its missing parents) created before the model was read, and left empty when it was refused."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" + bytes(range(256)) * 4)  # starts like a model, is not one
    model = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), model)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, other=np.zeros((4, 64), np.float32))  # no array for the model's input `features`
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = [([str(bad)], tmp_path / "new" / "deeper"), ([str(model), "--calibration", str(wrong)], tmp_path / "o"),
             ([str(bad)], existing), ([str(bad)], existing / "sub")]
    for args, out in cases:
        assert main(["optimize", *args, "--out", str(out), "--precision", "fp32", "--quiet"]) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("error: ")
        assert not out.exists() or out == existing, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "existing", "mlp.onnx", "wrong.npz"]
    assert not any(existing.iterdir())


# -- 5. static INT8 without calibration samples: refused by the CLI as by the upload --------------------------


def test_static_int8_without_calibration_is_refused_by_cli_and_upload_alike(serve, tmp_path: Path,  # noqa: ANN001
                                                                           capsys) -> None:  # noqa: ANN001
    """Was: `onnxforge optimize --precision auto --int8-mode static` without --calibration ran, silently ignoring the
    mode (auto never reads it), while the upload refused the same combination with a 400."""
    model = tmp_path / "mlp.onnx"
    onnx.save(models.mlp(), model)
    with serve(run_worker=False) as api:
        for precision in ("auto", "int8", "fp32"):
            out = tmp_path / f"out-{precision}"
            code = main(["optimize", str(model), "--out", str(out), "--precision", precision, "--int8-mode", "static",
                         "--time-budget", "2", "--quiet"])
            [line] = capsys.readouterr().err.splitlines()
            assert (code, out.exists()) == (2, False), line
            uploaded = api.upload(models.mlp(), name="m", precision=precision, int8_mode="static")
            assert uploaded.status_code == 400, uploaded.text
            message = uploaded.json()["error"]
            assert line == f"error: --int8-mode: {message}"
            assert "needs a calibration set" in message and "--calibration" in message
        assert api.client.get("/v1/models").json() == []


# -- 6. the API key is checked before "not ready" -------------------------------------------------------------


def test_while_the_service_is_not_ready_predict_checks_the_key_first(tmp_path: Path) -> None:
    """Was: the fast path answered 503 ("starting or stopping") to a client without a key, before checking it.
    The app is not started (no lifespan): its services are not there, as while it starts or stops."""
    read, admin = "read-key-0123456789abcdef", "admin-key-0123456789abcdef"
    feed = {"inputs": {"features": [[0.0] * 64]}}
    infer = {"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    for cors in ("", "https://example.org"):  # the fast path, then the normal stack (CORS turns the fast path off)
        settings = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "data", "run_worker": False,
                               "api_keys": f"admin:{admin}, read:{read}", "cors_origins": cors})
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        for path, body in (("/v1/models/m/predict", feed), ("/v1/models/m/versions/1/predict", feed),
                           ("/v2/models/m/infer", infer), ("/v2/models/m/versions/1/infer", infer)):
            assert client.post(path, json=body).status_code == 401, (cors, path)
            assert client.post(path, json=body, headers={"Authorization": "Bearer wrong-key-0123456789"}
                               ).status_code == 401, (cors, path)
            answer = client.post(path, json=body, headers={"Authorization": f"Bearer {read}"})
            assert answer.status_code == 503 and "starting or stopping" in answer.json()["error"], (cors, path)

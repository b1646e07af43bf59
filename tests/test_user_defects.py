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

from app.storage.base import OPTIMIZED, ORIGINAL, artifact_key
from optimizer.runtime import create_session
from tests import models
from tests.conftest import Api


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

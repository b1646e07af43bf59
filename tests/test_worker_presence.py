"""/readyz says whether any optimizer worker is there to run the queue (the workers' heartbeats in the
database), so an API started with --no-worker and no `onnxforge worker` anywhere is visible, not silent."""

from __future__ import annotations

import time

from tests import models
from tests.test_worker_limits import _second_worker


def _ready(api) -> dict:  # noqa: ANN001 - tests.conftest.Api
    response = api.client.get("/readyz")
    assert response.status_code == 200, response.text  # predict works without a worker: never a 503 for it
    return response.json()


def test_readyz_counts_the_workers_that_beat_and_warns_when_queued_jobs_have_none(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        ready = _ready(api)
        assert (ready["worker"], ready["workers_seen"]) == ("external", 0)
        assert "warning" not in ready  # nothing queued: nothing to warn about
        job_id = api.upload(models.mlp(), name="m", precision="fp32").json()["job_id"]
        ready = _ready(api)
        assert ready["workers_seen"] == 0
        assert "1 job(s) queued and no optimizer worker seen" in ready["warning"]
        assert "onnxforge worker" in ready["warning"]

        with _second_worker(api.services.settings) as worker:  # an `onnxforge worker` on the same database
            deadline = time.monotonic() + 60
            while _ready(api)["workers_seen"] != 1:
                assert worker.poll() is None and time.monotonic() < deadline, "the worker never beat"
                time.sleep(0.2)
            assert api.wait(job_id)["status"] == "succeeded"
            assert "warning" not in _ready(api)
        assert _ready(api)["workers_seen"] == 0  # a worker that stops cleanly takes itself off at once


def test_the_embedded_worker_beats_too(serve) -> None:  # noqa: ANN001
    with serve() as api:
        deadline = time.monotonic() + 30
        while (ready := _ready(api))["workers_seen"] != 1:
            assert time.monotonic() < deadline, ready
            time.sleep(0.2)
        assert ready["worker"] == "running"


def test_a_slow_poll_widens_the_window_a_worker_counts_in(serve) -> None:  # noqa: ANN001
    """An idle worker beats once per poll: with a 20 s poll, one seen 16 s ago is still there."""
    with serve(run_worker=False, worker_poll_s=20) as api:
        api.upload(models.mlp(), name="m", precision="fp32")
        assert "no optimizer worker seen in the last 60 s" in _ready(api)["warning"]

"""Upload validation is bounded (max_concurrent_validations): uploads over the limit wait, then get a
503 with Retry-After and leave nothing behind; within the limit they all succeed. The real app.

(Max concurrent jobs: tests/test_worker_limits.py; the session memory budget: tests/test_sessions_budget.py;
sizes, elements and job time/memory: tests/test_app_upload.py, tests/test_app_predict.py,
tests/test_hardening_hostile.py.)
"""

from __future__ import annotations

import threading
import time

import onnx

from tests import models
from tests.conftest import Api

BIG = models.mlp(features=512, hidden=1536)  # ~12 MiB: its validation takes a measurable while


def test_an_upload_that_finds_no_validation_slot_gets_503_with_retry_after(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, max_concurrent_validations=1, validation_wait_s=0.3) as api:
        limiter = api.services.validations
        with limiter.slot():  # another upload is being validated
            started = time.monotonic()
            busy = api.upload(models.mlp(), name="m")
            waited = time.monotonic() - started
            # Cheap refusals do not queue for a slot: a text file is refused at once.
            assert api.upload(b"name: resnet\n", name="t").status_code == 415
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "5"
        assert "ONNXFORGE_MAX_CONCURRENT_VALIDATIONS=1" in busy.json()["error"]
        assert waited >= 0.3
        assert limiter.refused == 1
        assert api.client.get("/v1/models").json() == []
        assert not list(api.services.settings.uploads_dir.iterdir()), "a refused upload left its file behind"
        assert not list(api.services.settings.artifacts_dir.rglob("*.onnx"))

        again = api.upload(models.mlp(), name="m")  # the slot is free again
        assert again.status_code == 202, again.text


def _burst(api: Api, model: onnx.ModelProto, n: int) -> list[int]:
    data = model.SerializeToString()
    statuses: list[int] = [0] * n
    barrier = threading.Barrier(n)

    def send(i: int) -> None:
        barrier.wait()
        statuses[i] = api.upload(data, name=f"m{i}").status_code

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return statuses


def test_a_burst_of_uploads_is_validated_within_the_limit(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, max_concurrent_validations=1, validation_wait_s=60) as api:
        assert _burst(api, BIG, 4) == [202] * 4  # they waited their turn
        assert (api.services.validations.peak, api.services.validations.refused) == (1, 0)
        assert len(api.client.get("/v1/models").json()) == 4
    # The same burst without the bound does validate several at once: the test above can see a breach.
    with serve(run_worker=False, max_concurrent_validations=4, validation_wait_s=60) as api:
        assert _burst(api, BIG, 4) == [202] * 4
        assert api.services.validations.peak >= 2

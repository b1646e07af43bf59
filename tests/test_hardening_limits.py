"""Limits on the real app: upload validation is bounded (max_concurrent_validations: uploads over the
limit wait, then get a 503 with Retry-After and leave nothing behind; within the limit they all
succeed), and max_input_elements holds on /v1 and /v2.

(Max concurrent jobs: tests/test_worker_limits.py; the session memory budget: tests/test_sessions_budget.py;
upload sizes: tests/test_app_upload.py; the predict body: tests/test_hardening_access.py; job time and
memory: tests/test_hardening_hostile.py and tests/test_app_jobs.py.)
"""

from __future__ import annotations

import threading
import time

import onnx
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests import models
from tests.conftest import TEST_SETTINGS, Api

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
        scraped = api.client.get("/metrics").text
        assert "onnxforge_upload_validations_refused_total 1.0" in scraped
        assert "onnxforge_upload_validations_running 0.0" in scraped
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


def test_max_input_elements_is_enforced_on_v1_and_v2(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, max_input_elements=4 * 64) as api:  # 4 rows of the MLP's 64 features
        assert api.upload(models.mlp(), name="m").status_code == 202
        for rows, status in ((4, 200), (5, 400)):
            feed = models.random_feed(models.mlp(), batch=rows)
            response = api.predict("m", feed)
            assert response.status_code == status, response.text
            v2 = {"inputs": [{"name": name, "shape": list(value.shape), "datatype": "FP32",
                              "data": value.ravel().tolist()} for name, value in feed.items()]}
            infer = api.client.post("/v2/models/m/infer", json=v2)
            assert infer.status_code == status, infer.text
            if status == 400:
                for answer in (response, infer):
                    assert "320 elements, more than the limit of 256" in answer.json()["error"]
            else:
                assert len(response.json()["outputs"]["logits"]) == 4


def test_two_apps_in_one_process_each_keep_their_own_validation_limit(tmp_path) -> None:  # noqa: ANN001
    """The bound belongs to the app (Services.validations), not to the process: a second app started in the
    same process with another max_concurrent_validations leaves the first one's bound as it was."""
    one = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "one", "run_worker": False,
                      "max_concurrent_validations": 1, "validation_wait_s": 0.2})
    two = Settings(**{**TEST_SETTINGS, "data_dir": tmp_path / "two", "run_worker": False,
                      "max_concurrent_validations": 2, "validation_wait_s": 0.2})
    with TestClient(create_app(one)) as first, TestClient(create_app(two)) as second:
        api_one, api_two = Api(first), Api(second)
        limit_one, limit_two = api_one.services.validations, api_two.services.validations
        assert (limit_one.capacity, limit_two.capacity) == (1, 2)
        with limit_one.slot(), limit_two.slot():  # each app validating one upload
            assert api_one.upload(models.mlp(), name="a").status_code == 503  # its one slot is taken
            assert api_two.upload(models.mlp(), name="b").status_code == 202  # its second slot is free
        assert (limit_one.refused, limit_one.peak) == (1, 1)
        assert (limit_two.refused, limit_two.peak) == (0, 2)
        assert api_one.upload(models.mlp(), name="a").status_code == 202

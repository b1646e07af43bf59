"""Per-model batching settings: given at upload, stored with the version, honoured by predict.

Batches form predictably enough: after one warm-up predict (session loaded, version cached), N
predicts are started together on the app's own event loop; the first run alone (one per run slot)
and the others queue behind them, so the batch sizes /metrics records show which limit applied.
"""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text

from app.store import Base, Database
from optimizer.runtime import create_session
from tests import models
from tests.conftest import Api


def _predict_together(api: Api, name: str, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    async def main() -> list:
        predictions = await asyncio.gather(*(api.services.predict.predict(name, feed) for feed in feeds))
        return [p.outputs for p in predictions]

    return api.client.portal.call(main)


def _bucket(api: Api, name: str, le: str) -> int:
    text_ = api.client.get("/metrics").text
    match = re.search(r'onnxforge_batch_size_bucket\{le="' + le + r'",model="' + name
                      + r'",variant="original",version="1"\} ([0-9.e+]+)', text_)
    return int(float(match.group(1))) if match else 0


def _count_and_sum(api: Api, name: str) -> tuple[int, int]:
    text_ = api.client.get("/metrics").text
    found = {}
    for kind in ("count", "sum"):
        match = re.search(r"onnxforge_batch_size_" + kind + r'\{model="' + name
                          + r'",variant="original",version="1"\} ([0-9.e+]+)', text_)
        found[kind] = int(float(match.group(1))) if match else 0
    return found["count"], found["sum"]


def _check_answers(model, feeds: list[dict], results: list[dict]) -> None:  # noqa: ANN001
    session = create_session(model.SerializeToString())
    for feed, outputs in zip(feeds, results, strict=True):
        np.testing.assert_allclose(outputs["logits"], session.run(["logits"], feed)[0], rtol=1e-5, atol=1e-6)


def test_a_models_own_batch_size_is_honoured_and_others_keep_the_default(serve) -> None:  # noqa: ANN001
    model = models.mlp()
    # A long burst: the adaptive limit starts small and grows as the batcher times its runs; 12 requests once
    # all ran alone on a loaded machine.
    burst = 40
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(burst)]
    with serve(run_worker=False, registry_cache_ttl_s=60, batch_max_size=32) as api:
        assert api.upload(model, name="small2", batch_max_size="2").status_code == 202
        assert api.upload(model, name="plain").status_code == 202
        assert api.upload(model, name="alone", batch_max_size="1").status_code == 202
        for name in ("small2", "plain", "alone"):
            assert api.predict(name, feeds[0]).status_code == 200  # load and cache before the burst
            _check_answers(model, feeds, _predict_together(api, name, feeds))
        count, rows = _count_and_sum(api, "small2")
        assert rows == burst + 1 and count >= burst // 2 and _bucket(api, "small2", "2.0") == count  # batches <= 2 rows
        count, rows = _count_and_sum(api, "plain")
        assert rows == burst + 1 and count < burst  # batched (batches grow as the batcher times them: not all in one)
        assert _bucket(api, "plain", "2.0") < count  # and not held to 2 rows
        assert _count_and_sum(api, "alone") == (0, 0)  # never through the batcher
        described = api.client.get("/v1/models/small2").json()["versions"][0]
        assert described["batching"] == {"batch_max_size": 2}
        assert api.client.get("/v1/models/plain").json()["versions"][0]["batching"] == {}


def test_a_model_can_turn_batching_on_when_the_service_default_is_off(serve) -> None:  # noqa: ANN001
    model = models.mlp()
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(9)]
    with serve(run_worker=False, registry_cache_ttl_s=60, batch_max_size=1) as api:
        assert api.upload(model, name="on", batch_max_size="16", batch_max_delay_ms="0").status_code == 202
        assert api.upload(model, name="off").status_code == 202
        for name in ("on", "off"):
            assert api.predict(name, feeds[0]).status_code == 200
            _check_answers(model, feeds, _predict_together(api, name, feeds))
        count, rows = _count_and_sum(api, "on")
        assert rows == 10 and count < 10
        assert _count_and_sum(api, "off") == (0, 0)
        assert api.client.get("/v1/models/on").json()["versions"][0]["batching"] == {
            "batch_max_size": 16, "batch_max_delay_ms": 0.0}


def test_without_its_own_size_a_model_is_batched_only_where_the_probe_says_it_pays(serve) -> None:  # noqa: ANN001
    mlp, cnn = models.mlp(), models.cnn(channels=(16, 32, 64), image=64)
    with serve(run_worker=False, registry_cache_ttl_s=60, batch_max_size=32) as api:
        assert api.upload(mlp, name="mlp").status_code == 202
        assert api.upload(cnn, name="cnn").status_code == 202
        assert api.upload(cnn, name="cnn8", batch_max_size="8").status_code == 202  # its own size: no probe
        for name, model in (("mlp", mlp), ("cnn", cnn), ("cnn8", cnn)):
            feeds = [models.random_feed(model, batch=1, seed=i) for i in range(6)]
            assert api.predict(name, feeds[0]).status_code == 200
            results = _predict_together(api, name, feeds)
            session = create_session(model.SerializeToString())
            for feed, outputs in zip(feeds, results, strict=True):
                np.testing.assert_allclose(outputs["logits"], session.run(["logits"], feed)[0], rtol=1e-4, atol=1e-5)
        assert _count_and_sum(api, "mlp")[1] == 7
        assert _count_and_sum(api, "cnn") == (0, 0)
        count, rows = _count_and_sum(api, "cnn8")
        assert rows == 7 and count < 7


@pytest.mark.parametrize(("field", "value"), [
    ("batch_max_size", "0"), ("batch_max_size", "2.5"), ("batch_max_size", "4096"), ("batch_max_size", "many"),
    ("batch_max_delay_ms", "-1"), ("batch_max_delay_ms", "nan"), ("batch_max_delay_ms", "5000"),
])
def test_bad_batching_fields_are_400_and_store_nothing(serve, field: str, value: str) -> None:  # noqa: ANN001
    with serve(run_worker=False) as api:
        response = api.upload(models.mlp(), name="bad", **{field: value})
        assert response.status_code == 400, response.text
        assert list(response.json()) == ["error"] and field in response.json()["error"]
        assert api.client.get("/v1/models/bad").status_code == 404


def test_a_database_of_the_previous_release_opens_and_gets_the_new_column(serve, data_dir) -> None:  # noqa: ANN001
    # The previous release's schema: today's tables without the column added since.
    data_dir.mkdir(parents=True)
    url = f"sqlite:///{(data_dir / 'onnxforge.db').resolve()}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE model_versions DROP COLUMN serving"))
    engine.dispose()
    assert "serving" not in {c["name"] for c in inspect(create_engine(url)).get_columns("model_versions")}
    with serve(run_worker=False) as api:  # the app's start-up adds the column
        assert api.upload(models.mlp(), name="m", batch_max_size="4").status_code == 202
        assert api.predict("m", models.random_feed(models.mlp(), batch=2)).status_code == 200
        assert api.client.get("/v1/models/m").json()["versions"][0]["batching"] == {"batch_max_size": 4}
    database = Database(url)
    database.create_schema()  # a second start: nothing to add, no error
    database.dispose()


def test_a_postgresql_database_of_the_previous_release_gets_the_new_column(new_database) -> None:  # noqa: ANN001
    database = Database(new_database())
    Base.metadata.create_all(database.engine)
    with database.engine.begin() as connection:
        connection.execute(text("ALTER TABLE model_versions DROP COLUMN serving"))
    database.create_schema()
    columns = {c["name"]: c for c in inspect(database.engine).get_columns("model_versions")}
    assert "serving" in columns and columns["serving"]["nullable"]
    database.dispose()

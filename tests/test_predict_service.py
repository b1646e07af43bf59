"""Which version serves: concurrent requests share one registry lookup, and a lookup that an upload
or delete overtook is not remembered. The real registry runs; a wrapper only counts or holds its calls."""

from __future__ import annotations

import asyncio
import threading

from tests import models


def test_concurrent_requests_share_one_registry_lookup(serve) -> None:  # noqa: ANN001
    model = models.mlp()
    with serve(run_worker=False, registry_cache_ttl_s=0) as api:  # TTL 0: every request asks the registry
        assert api.upload(model, name="m").status_code == 202
        assert api.predict("m", models.random_feed(model, batch=1)).status_code == 200
        registry = api.services.registry
        real, calls = registry.resolve, []

        def counting(*args):  # noqa: ANN002, ANN202
            calls.append(args)
            return real(*args)

        registry.resolve = counting
        feeds = [models.random_feed(model, batch=1, seed=i) for i in range(10)]

        async def burst() -> list:
            return await asyncio.gather(*(api.services.predict.predict("m", f) for f in feeds))

        predictions = api.client.portal.call(burst)
        assert [p.version for p in predictions] == [1] * 10
        assert len(calls) == 1  # not one per waiting request
        assert api.predict("m", feeds[0]).status_code == 200
        assert len(calls) == 2  # and with TTL 0 the next request asks again


def test_a_lookup_overtaken_by_an_upload_is_not_remembered(serve) -> None:  # noqa: ANN001
    model = models.mlp()
    with serve(run_worker=False, registry_cache_ttl_s=3600) as api:
        assert api.upload(model, name="m").status_code == 202
        registry, predict = api.services.registry, api.services.predict
        real, entered, release = registry.resolve, threading.Event(), threading.Event()

        def held(*args):  # noqa: ANN002, ANN202
            entered.set()
            assert release.wait(10)
            return real(*args)

        registry.resolve = held
        feed = models.random_feed(model, batch=1)
        future = api.client.portal.start_task_soon(predict.predict, "m", feed)
        assert entered.wait(10)
        api.client.portal.call(lambda: predict.invalidate("m"))  # an upload or delete happened meanwhile
        release.set()
        assert future.result(10).version == 1  # the request itself is answered
        registry.resolve = real
        assert ("m", None) not in predict._resolved  # but its possibly stale answer is not kept for an hour
        assert api.predict("m", feed).status_code == 200
        assert ("m", None) in predict._resolved


def test_a_session_loaded_again_is_the_one_that_runs(serve) -> None:  # noqa: ANN001
    """A model's session unloaded (the LRU, a forget) and loaded again serves its requests; before, its route
    kept running (and holding) the unloaded one."""
    model = models.mlp()
    with serve(run_worker=False, registry_cache_ttl_s=3600) as api:
        assert api.upload(model, name="m").status_code == 202
        feed = models.random_feed(model, batch=1)
        assert api.predict("m", feed).status_code == 200
        predict = api.services.predict
        (key,) = predict._routes
        old = predict.sessions.peek(key)
        assert predict.sessions.evict(lambda k: True) == 1
        assert api.predict("m", feed).status_code == 200
        new = predict.sessions.peek(key)
        assert new is not None and new is not old
        assert predict._routes[key].runner.session is new.session

"""Dynamic batching: requests that share a run get the answers they would get alone; shapes never mix."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from app.metrics import Metrics
from app.runtime.batching import (
    RETRY_AFTER,
    Batcher,
    BatchPolicy,
    batch_limit,
    batchable,
    batching_pays,
    in_thread,
)
from app.runtime.signature import TensorSpec, signature_of
from optimizer.runtime import SessionSettings, create_session
from tests import models


def _session(model):  # noqa: ANN001, ANN202
    return create_session(model.SerializeToString(), SessionSettings(intra_op_threads=1))


@pytest.fixture(scope="module")
def executor():  # noqa: ANN201
    with ThreadPoolExecutor(2) as pool:
        yield pool


def _gather(batcher: Batcher, session, names: list[str], feeds: list[dict],  # noqa: ANN001
            policy: BatchPolicy | None = None) -> list:
    async def main() -> list:
        runs = asyncio.gather(*(batcher.run("key", session, names, f, policy) for f in feeds))
        return await asyncio.wait_for(runs, 10)  # a policy that waits when it should not fails here, not hangs

    return asyncio.run(main())


def test_batched_answers_equal_answers_alone_and_batches_form(executor) -> None:  # noqa: ANN001
    model = models.mlp()
    session = _session(model)
    sizes: list[int] = []
    batcher = Batcher(executor, max_batch_size=8, observe=lambda key, depth, size, waited: sizes.append(size))
    for _ in range(40):  # the limit grows from burst to burst: on this MLP a row costs less in a bigger batch
        sizes.clear()
        feeds = [models.random_feed(model, batch=1 + i % 3, seed=i) for i in range(12)]
        results = _gather(batcher, session, ["logits"], feeds)
        for feed, (got,) in zip(feeds, results, strict=True):
            (alone,) = session.run(["logits"], feed)
            assert got.shape == alone.shape
            np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-6)
        assert all(s <= 8 for s in sizes) and sum(sizes) == sum(f["features"].shape[0] for f in feeds)
        if max(sizes) > 3:
            break
    # The first requests go at once, one per run slot; the others queued and went as batches of <= 8 rows
    # (once the batcher had timed that a row costs less in a batch: a noisy timing can delay it a few bursts).
    assert max(sizes) > 3


def test_different_sequence_lengths_are_never_batched_together(executor) -> None:  # noqa: ANN001
    model = models.transformer()
    session = _session(model)
    batches: list[int] = []
    batcher = Batcher(executor, max_batch_size=32, observe=lambda key, depth, size, waited: batches.append(size))
    feeds = [models.random_feed(model, batch=1, seq=4 + 2 * (i % 2), seed=i) for i in range(9)]
    for feed in feeds:
        feed["attention_mask"][0, -1] = 0
    results = _gather(batcher, session, ["last_hidden_state"], feeds, BatchPolicy(max_batch_size=32, max_delay_s=0.3))
    for feed, (got,) in zip(feeds, results, strict=True):
        np.testing.assert_allclose(got, session.run(["last_hidden_state"], feed)[0], rtol=1e-4, atol=1e-5)
    # Gathered for 0.3 s (nothing timed yet: the limit is the maximum), then dispatched when the timer
    # fires: the 9 split by length into 5 (seq 4) and 4 (seq 6) on the two run slots, never one batch of 9.
    # (Mixed lengths would not even concatenate: every request of such a batch would fail.)
    assert sorted(batches) == [4, 5]


def test_a_nan_request_does_not_leak_into_its_batch_mates(executor) -> None:  # noqa: ANN001
    model = models.mlp()
    session = _session(model)
    batcher = Batcher(executor, max_batch_size=8)
    good = [models.random_feed(model, batch=1, seed=i) for i in range(4)]
    bad = {"features": np.full((1, 64), np.nan, np.float32)}  # runs, but NaN must stay in its own answer
    results = _gather(batcher, session, ["logits"], [*good[:2], bad, *good[2:]])
    assert np.isnan(results[2][0]).all()
    for feed, (got,) in zip(good, [r for i, r in enumerate(results) if i != 2], strict=True):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, session.run(["logits"], feed)[0], rtol=1e-5, atol=1e-6)


def test_errors_reach_the_caller(executor) -> None:  # noqa: ANN001
    session = _session(models.mlp())
    batcher = Batcher(executor)
    with pytest.raises(Exception, match="features"):
        _gather(batcher, session, ["logits"], [{"features": np.zeros((1, 63), np.float32)}])


def test_a_dispatch_that_cannot_start_answers_its_requests_instead_of_leaving_them_waiting() -> None:
    """The dispatch runs from call_soon, where a raise would reach only the loop's log (the callers would hang)."""
    stopped = ThreadPoolExecutor(1)
    stopped.shutdown()
    session = _session(models.mlp())
    batcher = Batcher(stopped, max_batch_size=8)
    feed = models.random_feed(models.mlp(), batch=1)

    async def main() -> None:
        await asyncio.wait_for(batcher.run("m", session, ["logits"], feed), timeout=5)

    with pytest.raises(RuntimeError, match="shutdown"):
        asyncio.run(main())


def test_which_models_are_batchable() -> None:
    mlp_in, mlp_out = signature_of(_session(models.mlp()))
    assert batchable(mlp_in, mlp_out)
    enc_in, enc_out = signature_of(_session(models.transformer()))
    assert batchable(enc_in, enc_out)
    fixed = TensorSpec("x", "tensor(float)", np.dtype(np.float32), (1, 64))
    dynamic = TensorSpec("y", "tensor(float)", np.dtype(np.float32), ("batch", 10))
    unknown_rank = TensorSpec("y", "tensor(float)", np.dtype(np.float32), None)
    other_symbol = TensorSpec("z", "tensor(float)", np.dtype(np.float32), ("n", 3))
    assert not batchable([fixed], [dynamic])
    assert not batchable([dynamic], [unknown_rank])
    assert not batchable([dynamic, other_symbol], [dynamic])


def test_batch_metrics_are_exported(executor) -> None:  # noqa: ANN001
    metrics = Metrics(lambda: {}, lambda: 0)
    model = models.mlp()
    batcher = Batcher(executor, observe=lambda key, *rest: metrics.observe_batch(("mlp", "1", "original"), *rest))
    _gather(batcher, _session(model), ["logits"], [models.random_feed(model, batch=1, seed=i) for i in range(5)],
            BatchPolicy(max_batch_size=3, max_delay_s=0.2))  # gathered: 3 rows go at once, 2 when the timer fires
    text = metrics.render()[0].decode()
    assert 'onnxforge_batch_size_count{model="mlp",variant="original",version="1"} 2.0' in text
    assert 'onnxforge_batch_size_sum{model="mlp",variant="original",version="1"} 5.0' in text
    assert 'onnxforge_batch_queue_seconds_count{model="mlp",variant="original",version="1"} 5.0' in text
    assert "onnxforge_batch_queue_depth{" in text


def test_requests_due_in_one_loop_iteration_go_as_one_batch(executor) -> None:  # noqa: ANN001
    """The first request of a burst does not leave alone while its company is already on the loop."""
    model = models.mlp()
    session = _session(model)
    sizes: list[int] = []
    batcher = Batcher(executor, max_batch_size=32, max_running=2,
                      observe=lambda key, depth, size, waited: sizes.append(size))
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(10)]
    results = _gather(batcher, session, ["logits"], feeds)
    for feed, (got,) in zip(feeds, results, strict=True):
        np.testing.assert_allclose(got, session.run(["logits"], feed)[0], rtol=1e-5, atol=1e-6)
    assert sizes == [10]  # was [1, 1, 8]: the first two ran alone, the rest queued behind them
    sizes.clear()
    _gather(batcher, session, ["logits"], feeds[:1])
    assert sizes == [1]  # a lone request still goes (after the loop's current iteration), no timer


def test_two_running_batches_when_allowed(executor) -> None:  # noqa: ANN001
    """A burst over the batch limit fills both run slots at once: their runs meet at a barrier in the threads."""
    model = models.mlp()
    session = _session(model)
    meeting = threading.Barrier(2, timeout=10)
    runs = []

    class Meeting:  # the real session; its first two runs wait for each other, so they must run at the same time
        def run(self, names, feed):  # noqa: ANN001, ANN202
            runs.append(1)
            if len(runs) <= 2:
                meeting.wait()
            return session.run(names, feed)

    sizes: list[int] = []
    batcher = Batcher(executor, max_batch_size=32, max_running=2,
                      observe=lambda key, depth, size, waited: sizes.append(size))
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(10)]
    results = _gather(batcher, Meeting(), ["logits"], feeds, BatchPolicy(max_batch_size=4))
    for feed, (got,) in zip(feeds, results, strict=True):
        np.testing.assert_allclose(got, session.run(["logits"], feed)[0], rtol=1e-5, atol=1e-6)
    assert not meeting.broken  # with one slot the first run waits alone until the barrier breaks
    assert sizes == [4, 4, 2]


def test_a_lone_request_waits_for_the_run_in_flight_instead_of_taking_the_other_slot_alone(executor) -> None:  # noqa: ANN001
    """While a run is in flight, a request that arrives alone does not take the second slot by itself; a
    second request gives it company and the two take it together. (Over HTTP at c=32 on the tiny MLP 48% of
    runs were of one row: requests trickle in from the sockets, and each one found the other slot free.)"""
    model = models.mlp()
    session = _session(model)
    gate = threading.Event()
    runs = []

    class Gated:  # the real session; its first run is held until the test lets it go
        def run(self, names, feed):  # noqa: ANN001, ANN202
            runs.append(1)
            if len(runs) == 1:
                gate.wait(10)
            return session.run(names, feed)

    sizes: list[int] = []
    batcher = Batcher(executor, max_batch_size=32, max_running=2,
                      observe=lambda key, depth, size, waited: sizes.append(size))
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(3)]

    async def arrive(feed: dict) -> asyncio.Future:
        task = asyncio.ensure_future(batcher.run("key", Gated(), ["logits"], feed))
        for _ in range(5):  # its own loop iterations: a dispatch it may cause has happened
            await asyncio.sleep(0)
        return task

    async def main() -> list:
        try:
            tasks = [await arrive(feeds[0])]  # dispatched: its run is in flight, held at the gate
            tasks.append(await arrive(feeds[1]))
            assert sizes == [1]  # alone: it waits (the old code ran it alone on the other slot: [1, 1])
            tasks.append(await arrive(feeds[2]))
            assert sizes == [1, 2]  # with company it takes the other slot while the first run is still held
        finally:
            gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), 10)

    results = asyncio.run(main())
    for feed, (got,) in zip(feeds, results, strict=True):
        np.testing.assert_allclose(got, session.run(["logits"], feed)[0], rtol=1e-5, atol=1e-6)


def test_a_models_own_policy_overrides_the_default(executor) -> None:  # noqa: ANN001
    model = models.mlp()
    session = _session(model)
    sizes: list[int] = []
    batcher = Batcher(executor, max_batch_size=32, observe=lambda key, depth, size, waited: sizes.append(size))
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(9)]
    results = _gather(batcher, session, ["logits"], feeds, BatchPolicy(max_batch_size=2, max_delay_s=0.2))
    for feed, (got,) in zip(feeds, results, strict=True):
        np.testing.assert_allclose(got, session.run(["logits"], feed)[0], rtol=1e-5, atol=1e-6)
    assert sizes[:2] == [2, 2] and sorted(sizes[2:]) == [1, 2, 2]  # the model's 2, not the batcher's 32


def test_a_delay_gathers_a_burst_and_a_full_batch_goes_at_once(executor) -> None:  # noqa: ANN001
    model = models.mlp()
    session = _session(model)
    sizes: list[int] = []
    batcher = Batcher(executor, observe=lambda key, depth, size, waited: sizes.append(size))
    feeds = [models.random_feed(model, batch=1, seed=i) for i in range(6)]
    _gather(batcher, session, ["logits"], feeds, BatchPolicy(max_batch_size=32, max_delay_s=0.05))
    assert sizes == [6]  # the first waited for company instead of running alone
    sizes.clear()
    # A 100 s delay: full batches must not wait for it (wait_for fails the test after 10 s if they do).
    _gather(batcher, session, ["logits"], feeds[:4] * 2, BatchPolicy(max_batch_size=4, max_delay_s=100.0))
    assert sizes == [4, 4]


def test_the_probe_batches_an_mlp_but_not_a_cnn_whose_cost_per_row_does_not_fall() -> None:
    mlp = _session(models.mlp())
    assert batching_pays(mlp, signature_of(mlp)[0])  # 8 rows cost about one row: the call is the cost
    cnn = _session(models.cnn(channels=(16, 32, 64), image=64))
    assert not batching_pays(cnn, signature_of(cnn)[0])  # 8 rows cost about 8 rows
    # A single run over the limit is not probed further.
    assert not batching_pays(mlp, signature_of(mlp)[0], max_single_s=0.0)


def test_the_probe_says_no_when_it_cannot_make_up_inputs_or_the_graph_refuses_them() -> None:
    typed = _session(models.typed_io())  # a string input: no made-up value
    assert not batching_pays(typed, signature_of(typed)[0])
    mlp = _session(models.mlp())
    inputs, _ = signature_of(mlp)
    wrong = [TensorSpec(inputs[0].name, inputs[0].type, inputs[0].dtype, ("batch", 63))]  # the graph wants 64
    assert not batching_pays(mlp, wrong)


def test_the_batch_limit_grows_only_while_rows_get_cheaper() -> None:
    fresh = 10  # dispatch count of every timing below: none is stale at dispatch 10
    mlp = {1: (55e-6, fresh), 2: (30e-6, fresh), 4: (16e-6, fresh), 8: (9e-6, fresh), 16: (6e-6, fresh),
           32: (5e-6, fresh)}  # the hop to a thread dominates: a row costs ever less
    assert batch_limit(mlp, 10, 32) == 32
    assert batch_limit(mlp, 10, 12) == 12  # never above the maximum, also when it is no power of two
    cnn = {1: (0.85e-3, fresh), 2: (0.86e-3, fresh)}  # a row costs the same in a batch: run them one by one
    assert batch_limit(cnn, 10, 32) == 1
    encoder = {1: (0.30e-3, fresh), 2: (0.25e-3, fresh), 4: (0.24e-3, fresh)}  # pays up to 2, not beyond
    assert batch_limit(encoder, 10, 32) == 2
    assert batch_limit({1: (1e-4, fresh), 2: (0.5e-4, fresh)}, 10, 32) == 4  # 4 not timed yet: try it
    assert batch_limit({1: (1e-4, fresh)}, 10, 32) == 2
    assert batch_limit({4: (1e-4, fresh)}, 10, 32) == 1  # a gathered burst timed 4: time 1 row next
    assert batch_limit({}, 0, 32) == 32  # nothing timed: a burst gathered by max_delay_s goes whole
    # A size found not to pay is tried again once its timing is stale (the machine's load changes).
    assert batch_limit(cnn, fresh + RETRY_AFTER + 1, 32) == 2
    assert batch_limit(mlp, fresh + RETRY_AFTER + 1, 32) == 32  # one that pays is not: it keeps being timed



def test_in_thread_hands_back_results_and_errors_and_a_caller_may_go_away(executor) -> None:  # noqa: ANN001
    async def main() -> list[dict]:
        loop = asyncio.get_running_loop()
        problems: list[dict] = []
        loop.set_exception_handler(lambda _, context: problems.append(context))
        assert await in_thread(executor, sum, [1, 2, 3]) == 6
        with pytest.raises(ZeroDivisionError):
            await in_thread(executor, lambda: 1 / 0)
        gate = threading.Event()
        gone = in_thread(executor, gate.wait, 5)
        gone.cancel()  # a client that disconnected while its run was in the thread
        gate.set()
        assert await in_thread(executor, int, "7") == 7  # queued behind it or beside it: both have finished
        await asyncio.sleep(0.05)
        return problems

    assert asyncio.run(main()) == []  # settling a cancelled future raised nothing in the loop

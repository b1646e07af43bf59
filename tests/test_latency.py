"""optimizer.latency: interleaved timing. Structure and validity only, never a timing threshold."""

from __future__ import annotations

import json
import time
from pathlib import Path

import onnx
import pytest

from optimizer.errors import OptimizerError
from optimizer.latency import (
    BenchmarkError,
    BudgetExceededError,
    LatencyStats,
    batch_feed,
    measure,
    measure_batches,
)
from optimizer.runtime import SessionSettings
from tests.models import cnn, lstm, mlp, random_feed

FAST = {"min_runs": 20, "max_runs": 200, "target_seconds": 0.1, "warmup": 3}
SETTINGS = SessionSettings(intra_op_threads=1)


def _valid(stats: LatencyStats, batch: int, runs: int) -> None:
    assert stats.batch == batch and stats.runs >= runs and stats.warmup_runs == FAST["warmup"]
    assert 0 < stats.p50_ms <= stats.p90_ms <= stats.p99_ms
    assert stats.mean_ms > 0 and stats.session_create_ms > 0
    assert stats.throughput_per_s == pytest.approx(batch * 1000 / stats.p50_ms)
    assert stats.provider == "cpu" and not stats.deadline_hit


def test_two_identical_models_measured_interleaved() -> None:
    model = cnn(image=16).SerializeToString()
    feed = random_feed(cnn(image=16), batch=1)
    stats = measure({"a": model, "b": model}, feed, SETTINGS, **FAST)
    assert list(stats) == ["a", "b"]
    for s in stats.values():
        _valid(s, batch=1, runs=FAST["min_runs"])
    assert stats["a"].runs == stats["b"].runs, "interleaved rounds time every model equally often"
    json.dumps(stats["a"].to_dict(), allow_nan=False)


def test_max_runs_caps_the_rounds_and_paths_are_accepted(tmp_path: Path) -> None:
    model = mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    stats = measure({"mlp": path}, random_feed(model, batch=4), SETTINGS, batch=4, min_runs=3, max_runs=5,
                    target_seconds=60.0, warmup=0)
    assert stats["mlp"].runs == 5 and stats["mlp"].batch == 4 and stats["mlp"].warmup_runs == 0


def test_deadline_cuts_the_measurement_short() -> None:
    model = mlp().SerializeToString()
    stats = measure({"a": model, "b": model}, random_feed(mlp(), batch=1), SETTINGS, min_runs=10, max_runs=10**7,
                    target_seconds=3600.0, warmup=1, deadline=time.monotonic() + 0.3)
    for s in stats.values():
        assert s.deadline_hit and 1 <= s.runs < 10**7


def test_deadline_already_past_is_refused() -> None:
    with pytest.raises(BudgetExceededError, match="time budget ran out"):
        measure({"a": mlp().SerializeToString()}, random_feed(mlp()), deadline=time.monotonic() - 1)


def test_measure_batches_uses_batch_1_and_8_when_the_batch_axis_is_dynamic() -> None:
    model = cnn(image=16)
    data = model.SerializeToString()
    results = measure_batches({"a": data, "b": data}, random_feed(model, batch=3), SETTINGS, **FAST)
    assert sorted(results) == [1, 8]
    for batch, by_model in results.items():
        assert sorted(by_model) == ["a", "b"]
        for s in by_model.values():
            _valid(s, batch=batch, runs=FAST["min_runs"])
    assert results[1]["a"].session_create_ms == results[8]["a"].session_create_ms, "one session, reused"


def test_measure_batches_with_a_fixed_axis_0_times_the_feed_as_given() -> None:
    model = lstm()  # input [seq=8, batch, features]: axis 0 is fixed
    results = measure_batches({"lstm": model.SerializeToString()}, random_feed(model, batch=2), SETTINGS, **FAST)
    assert list(results) == [1]
    _valid(results[1]["lstm"], batch=1, runs=FAST["min_runs"])


def test_batch_feed_repeats_and_cuts_rows() -> None:
    feed = random_feed(mlp(), batch=3)
    grown = batch_feed(feed, 8)["features"]
    assert grown.shape == (8, 64) and (grown[3:6] == feed["features"]).all()
    assert batch_feed(feed, 1)["features"].shape == (1, 64)


def test_a_model_that_refuses_the_inputs_is_a_benchmark_error() -> None:
    with pytest.raises(BenchmarkError, match=r"model 'b' refused the timing inputs \['features'\].*image") as info:
        measure({"a": mlp().SerializeToString(), "b": cnn().SerializeToString()}, random_feed(mlp()), SETTINGS,
                **FAST)
    assert isinstance(info.value, OptimizerError)


def test_a_model_that_does_not_load_is_a_benchmark_error() -> None:
    with pytest.raises(BenchmarkError, match="model 'junk' cannot be loaded for timing"):
        measure({"junk": b"not an onnx model"}, random_feed(mlp()), SETTINGS, **FAST)


def test_bad_run_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="min_runs <= max_runs"):
        measure({"a": mlp().SerializeToString()}, random_feed(mlp()), min_runs=10, max_runs=5)


def test_extensions_bound_how_often_a_measurement_is_extended() -> None:
    """The confirmation extends while its A/A control excludes 1.0, at most `extensions` times: never a loop."""
    model = mlp().SerializeToString()
    asked: list[int] = []

    def always(batch: int, stats: dict[str, LatencyStats]) -> bool:
        asked.append(stats["a"].runs)
        return True

    by_batch = measure_batches({"a": model}, random_feed(mlp(), batch=1), SETTINGS, batch_sizes=(1,),
                               extend_if=always, extensions=3, **FAST)
    assert len(asked) == 3 and by_batch[1]["a"].extended
    assert by_batch[1]["a"].runs >= 4 * FAST["min_runs"] and asked == sorted(asked)

"""A run cannot take the replica's memory: serving sessions share one capped ONNX Runtime arena (security review,
finding 3). A tiny model that expands a row to more floats than the cap fails that run at once, without allocating,
and every other model runs on, with the same outputs as a session of its own.

The cap is one per process (ONNX Runtime's env allocator) and the first session cache's; the bombs below are sized
from the cap really registered (shared_arena's answer), so they ask twice the cap whatever ran first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.runtime.sessions import RUN_MEMORY_FLOOR, run_memory_error
from optimizer.runtime import SessionSettings, arena_refusal, create_session, shared_arena
from tests import models
from tests.conftest import serving_good_model


def _expand_bomb(floats: int) -> onnx.ModelProto:
    """x [batch, 1] -> Expand to [batch, floats] -> ReduceSum: a few hundred bytes whose run asks floats * 4 bytes per
    row. Not constant-folded (x is an input), so the allocation happens at run time, in the arena."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["big"]),
         helper.make_node("ReduceSum", ["big", "axes"], ["y"], keepdims=1)],
        "expand_bomb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([1, floats], np.int64), "shape"),
         numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_run_past_the_shared_arena_fails_alone_and_the_others_run_the_same() -> None:
    cap = shared_arena(RUN_MEMORY_FLOOR)
    capped = SessionSettings(arena_max_bytes=cap)
    bomb = create_session(_expand_bomb(cap // 2).SerializeToString(), capped)  # 2x the cap for one row
    with pytest.raises(Exception) as refused:  # noqa: PT011 - ONNX Runtime's own Fail type
        bomb.run(None, {"x": np.ones((1, 1), np.float32)})
    assert arena_refusal(refused.value) == (2 * cap, cap)
    assert arena_refusal(ValueError("some other failure")) is None

    model = models.mlp().SerializeToString()
    feed = {"features": np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)}
    (alone,) = create_session(model).run(None, feed)
    (shared,) = create_session(model, capped).run(None, feed)
    np.testing.assert_array_equal(shared, alone)


def test_the_service_answer_names_the_limit_and_the_setting() -> None:
    cap = shared_arena(RUN_MEMORY_FLOOR)
    bomb = create_session(_expand_bomb(cap // 2).SerializeToString(), SessionSettings(arena_max_bytes=cap))
    with pytest.raises(Exception) as refused:  # noqa: PT011 - ONNX Runtime's own Fail type
        bomb.run(None, {"x": np.ones((1, 1), np.float32)})
    error = run_memory_error(refused.value, "model 'bomb' version 1")
    assert error is not None and error.status_code == 507
    assert f"asked for {2 * cap / 2**20:,.0f} MiB at once" in str(error)
    assert f"left of the {cap / 2**20:,.0f} MiB" in str(error)
    assert "ONNXFORGE_SESSION_CACHE_MAX_MB" in str(error)
    assert run_memory_error(ValueError("Invalid rank for input"), "model 'bomb' version 1") is None


def _predict_bomb(tmp_path: Path):  # noqa: ANN202 - (bomb's answer, the good model's answer after it)
    with serving_good_model(tmp_path) as api:
        cap = api.services.sessions.settings.arena_max_bytes  # the cap the app's sessions got (the process's first)
        assert cap >= RUN_MEMORY_FLOOR
        assert api.upload(_expand_bomb(cap // 2), "bomb.onnx", name="bomb").status_code == 202
        bomb = api.client.post("/v1/models/bomb/predict", json={"inputs": {"x": [[1.0]]}})
        good = api.client.post("/v1/models/good/predict", json={"inputs": {"features": [[0.5] * 64]}})
        return bomb, good


def test_a_predict_past_the_arena_is_refused_and_the_other_models_serve(tmp_path: Path) -> None:
    bomb, good = _predict_bomb(tmp_path)
    assert bomb.status_code == 507, bomb.text
    assert "ONNXFORGE_SESSION_CACHE_MAX_MB" in bomb.text
    assert good.status_code == 200, good.text


def test_a_predict_past_the_arena_is_a_507_naming_the_setting(tmp_path: Path) -> None:
    bomb, _ = _predict_bomb(tmp_path)
    assert bomb.status_code == 507 and "ONNXFORGE_SESSION_CACHE_MAX_MB" in bomb.text

"""Without calibration samples the optimizer runs the model on generated inputs (dynamic dims 8); a model those do not
suit, like Silero VAD (its STFT reflect-pads the audio, its state [2, ?, 128] is batched), is tried once more on longer
signals (and batched states) before the job fails. Small models built with onnx.helper, real ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from optimizer.calibration import synthetic_samples
from optimizer.errors import ModelRunError
from optimizer.pipeline import GENERATED_RETRIES, OptimizeConfig, optimize

QUICK = OptimizeConfig(precision="fp32", time_budget_s=2.0, benchmark_seconds=0.05, threads=1)


def _vad_like(pad: int = 64, state: bool = False) -> onnx.ModelProto:
    """y = mean of Pad(x, reflect, `pad`), x[1, n]: runs only for n > `pad` (64: the generated 8 and 64 both fail).

    With `state`, also an RNN-like state[2, ?, 4] (unnamed batch dim, like Silero VAD's If-export) concatenated with
    x's rows, so the run also needs the state's ? to be x's batch.
    """
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, pad, 0, pad])
    nodes = [helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect"),
             helper.make_node("ReduceMean", ["padded"], ["y"], axes=[1], keepdims=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])]
    initializers = [pads]
    if state:
        initializers += [helper.make_tensor("wide", TensorProto.INT64, [2], [1, 4]),
                         helper.make_tensor("zero", TensorProto.INT64, [1], [0])]
        nodes += [helper.make_node("Expand", ["y", "wide"], ["rows"]),
                  helper.make_node("Unsqueeze", ["rows", "zero"], ["layer"]),
                  helper.make_node("Concat", ["state", "layer"], ["state_out"], axis=0)]
        inputs.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 4]))
        outputs.append(helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [3, None, 4]))
    graph = helper.make_graph(nodes, "vad_like", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("state", [False, True], ids=["padded-signal", "padded-signal-and-batched-state"])
def test_a_model_refusing_short_generated_inputs_is_optimized_on_longer_ones(tmp_path: Path, state: bool) -> None:
    """Before: the job failed ("upload real calibration samples") although longer generated inputs run."""
    result = optimize(_vad_like(state=state).SerializeToString(), out_dir=tmp_path, config=QUICK)
    calibration = result.report["calibration"]
    assert calibration["synthetic"] and calibration["holdout_samples"] == 8
    retried = calibration["notes"][-1]
    assert "refused the first generated inputs" in retried and "Pad reflect" in retried, retried
    assert "x [1, 256]" in retried, retried
    if state:
        assert "state [2, 1, 4]" in retried, retried
    assert (tmp_path / "model.onnx").is_file()


def test_when_no_generated_inputs_run_the_first_error_stands(tmp_path: Path) -> None:
    """A model no retry suits (it pads more than the longest generated signal) fails with the first inputs' error."""
    longest = max(sizes["dynamic_dim"] for sizes in GENERATED_RETRIES)
    with pytest.raises(ModelRunError, match=r"Pad reflect.*Input shape:\{1,8\}") as raised:
        optimize(_vad_like(pad=longest + 1).SerializeToString(), out_dir=tmp_path, config=QUICK)
    assert type(raised.value.__cause__).__module__.startswith("onnxruntime")  # ONNX Runtime's own error, wrapped


def test_state_batching_is_only_for_the_retry() -> None:
    """A transformer's [1, ?, hidden] looks like a state [layers, ?, hidden]: the first generated inputs give it 8."""
    model = _vad_like(state=True)
    assert synthetic_samples(model, count=1).holdout[0]["state"].shape == (2, 8, 4)
    assert synthetic_samples(model, count=1, states_batched=True).holdout[0]["state"].shape == (2, 1, 4)
    assert synthetic_samples(model, count=1, states_batched=True).holdout[0]["x"].shape == (1, 8)
    np.testing.assert_array_equal(synthetic_samples(model, count=1, states_batched=True).holdout[0]["x"],
                                  synthetic_samples(model, count=1).holdout[0]["x"])

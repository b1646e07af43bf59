"""The library's errors say what to fix (a user review, findings 4 and 9): config values refused up front, a model that
loads but cannot run explained as the worker and the CLI explain it (one mapping, optimizer.errors), inspect() taking
what optimize() takes, calibration= a dict of arrays, and old opsets pointed at onnx's version converter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer import ModelRunError, OptimizerError, UnsupportedModelError, load_model
from optimizer.calibration import load_samples
from optimizer.errors import LIBRARY_HOW_TO_CALIBRATE, CalibrationError, InvalidModelError, explain
from optimizer.graph_inspect import inspect
from optimizer.pipeline import OptimizeConfig, optimize
from tests import models

QUICK = {"precision": "fp32", "time_budget_s": 10.0, "benchmark_seconds": 0.05, "batch_sizes": (1,), "threads": 1}


def broken_conv() -> onnx.ModelProto:
    """Loads (checker and ONNX Runtime accept it) but fails on its own declared input: 3 channels into a Conv of 5."""
    w = numpy_helper.from_array(np.ones((4, 5, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def impossible_reshape() -> onnx.ModelProto:
    """x [n, 4] reshaped to [7, 7]: no n runs it, but with a dynamic dim that is not provable from its declaration."""
    shape = numpy_helper.from_array(np.array([7, 7], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 7])], [shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("settings", "words"), [
    ({"batch_sizes": ()}, "batch_sizes must list one or more whole numbers >= 1"),
    ({"batch_sizes": (0,)}, "batch_sizes must list one or more whole numbers >= 1, e.g. (1, 8)"),
    ({"batch_sizes": (1.5,)}, "got (1.5,)"),
    ({"holdout_fraction": 0}, "holdout_fraction is the share of the calibration samples held back"),
    ({"holdout_fraction": 1.5}, "between 0 and 1, both excluded (default 0.2), got 1.5"),
    ({"threads": -1}, "threads must be 0 (ONNX Runtime's default, as serving uses) or a number of intra-op threads"),
    ({"provider": "gpu"}, "provider must be one of auto, cpu, cuda, not 'gpu'"),
    ({"benchmark_seconds": 0}, "benchmark_seconds must be a number of seconds > 0"),
    ({"time_budget_s": float("nan")}, "time_budget_s must be a number of seconds > 0, got nan"),
    ({"min_cosine": 5}, "min_cosine must lie between -1 and 1"),
])
def test_config_values_are_refused_before_any_work_saying_what_to_fix(tmp_path: Path, settings: dict,
                                                                       words: str) -> None:
    """Before: batch_sizes=() raised "min() arg is an empty sequence" after building variants; holdout_fraction=0 a
    bare ValueError; threads=-1 ran unannounced. A model file that does not exist shows the config is checked first."""
    with pytest.raises(OptimizerError) as raised:
        optimize(tmp_path / "missing.onnx", out_dir=tmp_path / "out", config=OptimizeConfig(**settings))
    assert words in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_a_model_failing_on_its_own_fixed_shapes_says_so_and_no_calibration_advice(tmp_path: Path) -> None:
    """Before: ONNX Runtime's raw Fail escaped optimize(); the worker said "generated inputs did not suit this model:
    upload calibration samples", wrong when every input shape is fixed: the generated inputs have those shapes."""
    with pytest.raises(ModelRunError) as raised:
        optimize(broken_conv().SerializeToString(), out_dir=tmp_path, config=OptimizeConfig(**QUICK))
    message = str(raised.value)
    assert message.startswith("the model fails on inputs of its own declared shapes (x [1, 3, 8, 8]): Fail: "), message
    assert "Input channels C is not equal to kernel channels * group. C: 3 kernel channels: 5" in message
    assert "the model itself is broken" in message and "calibration" not in message
    assert isinstance(raised.value, UnsupportedModelError)
    # the worker's and the CLI's wording is the same mapping, whatever way they say how to send real inputs
    assert explain(raised.value, generated_inputs=True, how_to_calibrate="UPLOAD SAMPLES") == message


def test_a_model_failing_on_generated_inputs_with_dynamic_dims_asks_for_real_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelRunError) as raised:
        optimize(impossible_reshape().SerializeToString(), out_dir=tmp_path, config=OptimizeConfig(**QUICK))
    message = str(raised.value)
    assert message.startswith("ONNX Runtime could not run the model on the inputs the optimizer generated"), message
    assert "dynamic dimensions set to 8, then to 256" in message
    assert "The input tensor cannot be reshaped to the requested shape. Input shape:{1,4}, requested shape:{7,7}" \
        in message
    assert "onnxruntime_src" not in message and "::" not in message  # ONNX Runtime's C++ frame is cut
    assert message.endswith("pass real inputs as calibration= (an .npz path or a dict {input name: array}, one array "
                            "per model input)")
    worker = explain(raised.value, generated_inputs=True, how_to_calibrate="upload calibration samples")
    assert worker == message.removesuffix(LIBRARY_HOW_TO_CALIBRATE) + "upload calibration samples"
    # on the user's own samples it says so
    samples = {"x": np.ones((6, 2, 4), np.float32)}
    with pytest.raises(ModelRunError, match=r"^ONNX Runtime fails to run the model on the calibration samples given: "
                                            r"Fail: .*Input shape:\{2,4\}"):
        optimize(impossible_reshape().SerializeToString(), out_dir=tmp_path, calibration=samples,
                 config=OptimizeConfig(**QUICK))


def test_inspect_takes_a_path_bytes_a_loaded_model_and_a_proto(tmp_path: Path) -> None:
    """Before: inspect("model.onnx") raised AttributeError: 'str' object has no attribute 'ByteSize'."""
    path = tmp_path / "cnn.onnx"
    onnx.save(models.cnn(), path)
    reports = [inspect(source).to_dict() for source in (path, str(path), path.read_bytes(), load_model(path),
                                                        load_model(path).proto)]
    assert all(report == reports[0] for report in reports)
    assert reports[0]["node_count"] == 9 and reports[0]["parameter_count"] == 1658
    with pytest.raises(InvalidModelError, match="cannot read the model file"):
        inspect(tmp_path / "missing.onnx")


def test_calibration_takes_a_dict_of_arrays_as_it_takes_an_npz(tmp_path: Path) -> None:
    """Before: calibration={"image": array} raised TypeError: expected str, bytes or os.PathLike object, not dict."""
    model = models.cnn()
    name = model.graph.input[0].name
    x = np.random.default_rng(0).standard_normal((10, 1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "s.npz", **{name: x})
    from_dict = load_samples({name: x}, model)
    from_file = load_samples(tmp_path / "s.npz", model)
    assert (len(from_dict.calibration), len(from_dict.holdout)) == (len(from_file.calibration),
                                                                    len(from_file.holdout)) == (6, 4)
    for a, b in zip(from_dict.holdout, from_file.holdout, strict=True):
        np.testing.assert_array_equal(a[name], b[name])
    assert from_dict.source == "the calibration dict"
    result = optimize(model, out_dir=tmp_path / "out", calibration={name: x}, config=OptimizeConfig(**QUICK))
    assert result.report["calibration"]["synthetic"] is False
    assert result.report["calibration"]["holdout_samples"] == 4
    with pytest.raises(CalibrationError, match=r"array\(s\) \['typo'\] match no model input"):
        load_samples({name: x, "typo": x}, model)
    with pytest.raises(CalibrationError, match="dtype <U1, not a number type"):
        load_samples({name: np.array(["a"] * 4)}, model)
    with pytest.raises(CalibrationError, match=r"calibration must be an .npz file \(its path or bytes\) or a dict "
                                               r"\{input name: array\}.*got a ndarray"):
        load_samples(x, model)


def _relu(opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=3)


@pytest.mark.parametrize("opset", [1, 3])
def test_an_opset_older_than_onnx_runtime_runs_points_at_the_version_converter(opset: int) -> None:
    """Before: "Could not find an implementation for Relu(1)"; check that ... the opset is supported" (the hint only
    knew too-new opsets). The converter it names does bring the model up to date."""
    model = _relu(opset)
    with pytest.raises(UnsupportedModelError) as raised:
        load_model(model.SerializeToString())
    message = str(raised.value)
    assert f"the model uses ai.onnx opset {opset}, older than ONNX Runtime runs (7 and newer)" in message, message
    assert "onnx.version_converter.convert_version(onnx.load(path), 17)" in message
    converted = onnx.version_converter.convert_version(model, 17)
    assert load_model(converted.SerializeToString()).proto.opset_import[0].version == 17


def test_an_old_opset_the_checker_refuses_gets_the_same_hint() -> None:
    """A model stamped opset 1 whose BatchNormalization lacks opset 1's `consumed_inputs`: the checker refuses it."""
    model = models.cnn()
    model.opset_import[0].version = 1
    with pytest.raises(InvalidModelError) as raised:
        load_model(model.SerializeToString())
    message = str(raised.value)
    assert message.startswith("the ONNX checker refuses the model: "), message
    assert "the model uses ai.onnx opset 1, older than ONNX Runtime runs (7 and newer)" in message

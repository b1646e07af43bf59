"""What a new user ran into in a first hour with the service, the CLI and the library (one test each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from optimizer.calibration import synthetic_samples
from optimizer.graph_inspect import inspect
from optimizer.pipeline import OptimizeConfig, optimize
from optimizer.report_table import variants_table
from tests import models
from tests.conftest import assert_only_good_serves, npz, post_bad, serving_good_model


def _model_with_weights_in_an_if(features: int = 16) -> onnx.ModelProto:
    """y = x @ W1 if flag else x @ W2, both weights inside the branches (how silero VAD keeps all of its own)."""
    rng = np.random.default_rng(0)

    def branch(name: str, weight_in_initializer: bool) -> onnx.GraphProto:
        weight = rng.normal(size=(features, features)).astype(np.float32)
        if weight_in_initializer:
            nodes = [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])]
            inits = [numpy_helper.from_array(weight, f"{name}_w")]
        else:
            nodes = [helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(weight)),
                     helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])]
            inits = []
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                  None)], inits)

    node = helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", True), else_branch=branch("else", False))
    graph = helper.make_graph(
        [node], "if_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, features])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_inspect_counts_the_weights_inside_if_branches() -> None:
    # `onnxforge inspect silero_vad.onnx` said "5 nodes, 1 parameters (0.0 KiB)" for a 2.3 MB model.
    report = inspect(_model_with_weights_in_an_if(features=16))
    assert report.node_count == 1  # the main graph's nodes only, as documented
    assert report.parameter_count == 2 * 16 * 16
    assert report.parameter_bytes == 2 * 16 * 16 * 4


def test_a_model_with_a_too_new_opset_is_refused_with_what_to_change(tmp_path: Path) -> None:
    # The 400 quoted ONNX Runtime whole: the server's temporary upload path and a C++ signature, no advice.
    model = models.mlp()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 2
    with serving_good_model(tmp_path / "data", run_worker=False) as api:
        response = post_bad(api, model.SerializeToString())
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert str(api.services.settings.data_dir) not in error
        assert "onnxruntime_src" not in error and "::" not in error
        assert f"export it again with opset {onnx.defs.onnx_opset_version()} or lower" in error
        assert_only_good_serves(api)


def test_the_cli_table_keeps_its_columns_with_autos_long_variant_names() -> None:
    # `onnxforge optimize --precision auto` printed repair variants' names over the status and size columns.
    long_name = "int8-static-minmax-qoperator-u8s8-heavy-repair-greedy2"
    variant = {"status": "rejected", "size_bytes": 2048, "node_count": 7, "reason": "slower than the baseline",
               "latency_ms": {"p50": 2.0, "p90": 3.0, "p99": 4.0}, "accuracy": None}
    report = {"baseline": "original", "selected": "original", "variants": [
        {**variant, "name": "original", "status": "ok", "reason": None},
        {**variant, "name": long_name},
    ]}
    rows = [line for line in variants_table(report).splitlines() if line.split() and line.split()[0].lstrip("*")
            in ("variant", "original", long_name)]
    assert len(rows) == 3
    status_at = {line.index(line.split()[1]) for line in rows}
    assert len(status_at) == 1, variants_table(report)
    p50_at = {line.index("p50 ms") + len("p50 ms") if "p50 ms" in line else line.index("2.000") + len("2.000")
              for line in rows}
    assert len(p50_at) == 1, variants_table(report)


def test_the_cli_table_says_how_many_runs_its_p99_comes_from() -> None:
    # The timing stops after ~2 s: MiniLM's p99 came from 22 runs (their maximum) and read like a tail latency.
    timing = {"p50": 9.55, "p90": 23.9, "p99": 39.5}
    report = {"baseline": "original", "selected": "original", "variants": [
        {"name": "original", "status": "ok", "size_bytes": 2048, "node_count": 7, "reason": None, "accuracy": None,
         "latency_ms": timing, "latency_by_batch": {"1": {"runs": 22, "p99_ms": 39.5}, "8": {"runs": 20}}},
    ]}
    header, _, row = variants_table(report).splitlines()
    end = header.index(" runs") + len(" runs")  # right-aligned: the value ends where the title does
    assert row[end - 5:end].strip() == "22", variants_table(report)


def _stride32_segmenter() -> onnx.ModelProto:
    """image[batch,3,H,W] + upsample(maxpool_32(image)): runs only when H and W are multiples of 32, like
    PaddleOCR's DBNet detector, whose feature pyramid adds maps of strides 4 to 32 back together."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    out = helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    scales = numpy_helper.from_array(np.array([1, 1, 32, 32], np.float32), "scales")
    nodes = [
        helper.make_node("MaxPool", ["image"], ["pooled"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Resize", ["pooled", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Add", ["image", "up"], ["maps"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "stride32", [image], [out], [scales]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_detector_uploaded_without_samples_is_optimized_not_failed_on_8x8_images(tmp_path: Path) -> None:
    # PaddleOCR's detector uploaded without a calibration set: 202, then the job failed ("Attempting to
    # broadcast an axis by a dimension other than 1. 2 by 8") on generated 8x8 images, and the model never served.
    result = optimize(_stride32_segmenter().SerializeToString(), out_dir=tmp_path / "out",
                      config=OptimizeConfig(precision="fp32"))
    assert result.report["calibration"]["synthetic"] is True
    assert result.report["selected"] in ("original", "fused")
    feed = synthetic_samples(_stride32_segmenter(), count=1).holdout[0]
    assert feed["image"].shape == (1, 3, 64, 64)


def test_an_upload_with_external_data_is_told_one_thing_to_do(tmp_path: Path) -> None:
    # The 400 said "upload it together with the model. The service takes the model as one .onnx file".
    onnx.save(models.mlp(), tmp_path / "mlp.onnx", save_as_external_data=True, location="mlp.data", size_threshold=0)
    with serving_good_model(tmp_path / "data") as api:
        response = post_bad(api, (tmp_path / "mlp.onnx").read_bytes())
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "'mlp.data'" in error and "save_as_external_data=False" in error
        assert "together" not in error
        assert_only_good_serves(api)


def test_what_the_calibration_set_lacks_is_on_the_version_not_only_in_the_report(tmp_path: Path) -> None:
    # 2 samples: one held back, and an INT8 variant was served as "3.6x, top-1 100%" on that one sample (on 40
    # fresh inputs its top-1 agreed 75% of the time). The warning was only inside report.calibration.notes.
    rng = np.random.default_rng(0)
    samples = npz(features=rng.normal(size=(5, 64)))  # float64 for a float32 input: cast, and noted
    with serving_good_model(tmp_path / "data") as api:
        response = api.upload(models.mlp(), "few.onnx", samples)
        assert response.status_code == 202, response.text
        notes = api.client.get("/v1/models/few").json()["versions"][0]["notes"]
        assert any("only 5 samples" in n and "held back 2" in n for n in notes), notes
        assert any("float64 to float32" in n for n in notes), notes

"""/v2: an output asked for with `parameters.classification` (tritonclient's InferRequestedOutput(class_count=3)) is
answered as Triton answers it (top-k "value:index" strings per row), never as if not asked; GET .../config gives a
minimal Triton model configuration."""

from __future__ import annotations

import json

import numpy as np

from tests import models

FEATURES = np.linspace(-1, 1, 128, dtype=np.float32).tolist()
INPUT = {"name": "features", "shape": [2, 64], "datatype": "FP32", "data": FEATURES}


def test_class_count_is_answered_and_config_describes_the_model(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, batch_max_size=8) as api:
        assert api.upload(models.mlp(), "mlp.onnx", name="mlp").status_code == 202
        assert api.upload(models.typed_io(), "typed.onnx", name="typed", batch_max_size="1").status_code == 202
        outputs = [{"name": "logits", "parameters": {"classification": 3, "binary_data": False}}]
        response = api.client.post("/v2/models/mlp/infer", json={"inputs": [INPUT], "outputs": outputs})
        plain = api.client.post("/v2/models/mlp/infer", json={"inputs": [INPUT], "outputs": [{"name": "logits"}]})
        assert plain.status_code == 200 and plain.json()["outputs"][0]["shape"] == [2, 10]
        assert response.status_code == 200, response.text
        top = response.json()["outputs"][0]
        assert top["datatype"] == "BYTES" and top["shape"] == [2, 3]
        logits = np.asarray(plain.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
        indexes = [[int(entry.split(":")[1]) for entry in top["data"][row * 3:(row + 1) * 3]] for row in range(2)]
        assert indexes == np.argsort(-logits, axis=1)[:, :3].tolist()

        for path in ("/v2/models/mlp/config", "/v2/models/mlp/versions/1/config"):
            config = api.client.get(path)
            assert config.status_code == 200, config.text
            assert config.json() == {
                "name": "mlp",
                "platform": "onnxruntime_onnx",
                # the most rows one request may carry: 64 MiB of body, less 64 KiB for the header, / 256 bytes a row
                "max_batch_size": (64 * 1024 * 1024 - 64 * 1024) // (64 * 4),
                "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [64]}],
                "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}],
                "dynamic_batching": {"preferred_batch_size": [8], "max_queue_delay_microseconds": 0},
            }
        typed = api.client.get("/v2/models/typed/config").json()  # batch size 1: requests are never combined
        assert "dynamic_batching" not in typed
        rows = typed["max_batch_size"]
        assert rows > 0 and [(t["name"], t["data_type"], t["dims"]) for t in typed["input"]] == [
            ("half", "TYPE_FP16", [4]),
            ("flag", "TYPE_BOOL", [4]),
            ("small", "TYPE_UINT8", [4]),
            ("text", "TYPE_STRING", []),
        ]
        assert api.client.get("/v2/models/nope/config").status_code == 404
        assert api.client.get("/v2/models/mlp/versions/9/config").status_code == 404


def test_config_max_batch_size_is_the_most_rows_a_request_is_served_with(serve) -> None:  # noqa: ANN001
    """It said the batcher's 32 while a 64-row request was served whole: now the server's own per-request limit."""
    with serve(run_worker=False, max_input_elements=100 * 64) as api:
        assert api.upload(models.mlp(), "mlp.onnx", name="mlp").status_code == 202
        config = api.client.get("/v2/models/mlp/config").json()
        assert config["max_batch_size"] == 100, config
        assert config["dynamic_batching"]["preferred_batch_size"] == [32]  # the service's batch_max_size
        for rows, status in ((64, 200), (100, 200), (101, 400)):
            features = np.ones((rows, 64), np.float32).ravel().tolist()
            answer = api.client.post("/v2/models/mlp/infer", json={"inputs": [
                {"name": "features", "shape": [rows, 64], "datatype": "FP32", "data": features}]})
            assert answer.status_code == status, (rows, answer.text)
            if status == 200:
                assert answer.json()["outputs"][0]["shape"] == [rows, 10]


def test_config_max_batch_size_fits_the_body_limit_in_binary(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, max_predict_body_bytes=2 * 64 * 1024) as api:
        assert api.upload(models.mlp(), "mlp.onnx", name="mlp").status_code == 202
        rows = api.client.get("/v2/models/mlp/config").json()["max_batch_size"]
        assert rows == 64 * 1024 // 256
        features = np.ones((rows, 64), np.float32)
        header = json.dumps({"inputs": [{"name": "features", "shape": [rows, 64], "datatype": "FP32",
                                         "parameters": {"binary_data_size": features.nbytes}}]}).encode()
        answer = api.client.post("/v2/models/mlp/infer", content=header + features.tobytes(),
                                 headers={"Inference-Header-Content-Length": str(len(header))})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"] == [rows, 10]

"""/v2: an output asked for with `parameters.classification` (tritonclient's InferRequestedOutput(class_count=3)) is
refused with a 400 rather than answered as if not asked; GET .../config gives a minimal Triton model configuration."""

from __future__ import annotations

import numpy as np

from tests import models

FEATURES = np.linspace(-1, 1, 128, dtype=np.float32).tolist()
INPUT = {"name": "features", "shape": [2, 64], "datatype": "FP32", "data": FEATURES}


def test_class_count_is_refused_and_config_describes_the_model(serve) -> None:  # noqa: ANN001
    with serve(run_worker=False, batch_max_size=8) as api:
        assert api.upload(models.mlp(), "mlp.onnx", name="mlp").status_code == 202
        assert api.upload(models.typed_io(), "typed.onnx", name="typed", batch_max_size="1").status_code == 202
        outputs = [{"name": "logits", "parameters": {"classification": 3, "binary_data": False}}]
        response = api.client.post("/v2/models/mlp/infer", json={"inputs": [INPUT], "outputs": outputs})
        assert response.status_code == 400, response.text
        assert "classification" in response.json()["error"] and "not supported" in response.json()["error"]
        plain = api.client.post("/v2/models/mlp/infer", json={"inputs": [INPUT], "outputs": [{"name": "logits"}]})
        assert plain.status_code == 200 and plain.json()["outputs"][0]["shape"] == [2, 10]

        for path in ("/v2/models/mlp/config", "/v2/models/mlp/versions/1/config"):
            config = api.client.get(path)
            assert config.status_code == 200, config.text
            assert config.json() == {
                "name": "mlp",
                "platform": "onnxruntime_onnx",
                "max_batch_size": 8,
                "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": [64]}],
                "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}],
            }
        typed = api.client.get("/v2/models/typed/config").json()
        assert typed["max_batch_size"] == 0
        assert [(t["name"], t["data_type"], t["dims"]) for t in typed["input"]] == [
            ("half", "TYPE_FP16", [-1, 4]),
            ("flag", "TYPE_BOOL", [-1, 4]),
            ("small", "TYPE_UINT8", [-1, 4]),
            ("text", "TYPE_STRING", [-1]),
        ]
        assert api.client.get("/v2/models/nope/config").status_code == 404
        assert api.client.get("/v2/models/mlp/versions/9/config").status_code == 404

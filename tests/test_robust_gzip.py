"""A compressed /v2 infer body is held to the predict body limit once unpacked, not only on the wire (a 1 MB
gzip body of zeros unpacks to 1 GiB). Both the fast path and the normal stack (CORS on) are checked."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest

from tests import models

LIMIT = 1 << 20


def _body(rows: int = 2) -> bytes:
    data = np.linspace(-1, 1, rows * 64, dtype=np.float32).tolist()
    tensor = {"name": "features", "shape": [rows, 64], "datatype": "FP32", "data": data}
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize("cors", ["", "http://example.com"], ids=["fast path", "normal stack"])
def test_a_body_that_unpacks_past_the_limit_is_413(serve, cors: str) -> None:  # noqa: ANN001
    with serve(run_worker=False, max_predict_body_bytes=LIMIT, cors_origins=cors) as api:
        assert api.upload(models.mlp(), "mlp.onnx", name="mlp").status_code == 202
        url = "/v2/models/mlp/infer"
        bomb = gzip.compress(b"\0" * (16 * LIMIT))
        assert len(bomb) < LIMIT
        for encoding, data in (("gzip", bomb), ("deflate", zlib.compress(b" " * (LIMIT + 1)))):
            response = api.client.post(url, content=data, headers={"Content-Encoding": encoding})
            assert response.status_code == 413, response.text
            assert "unpacks" in response.json()["error"] and str(LIMIT) in response.json()["error"]
        # Exactly at the limit (JSON padded with spaces) still unpacks, and answers.
        exact = _body() + b" " * (LIMIT - len(_body()))
        response = api.client.post(url, content=gzip.compress(exact), headers={"Content-Encoding": "gzip"})
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["shape"] == [2, 10]
        # gzip members one after another (what gzip.decompress read) still work; a cut-off stream is a 400.
        body = _body()
        two = gzip.compress(body[:50]) + gzip.compress(body[50:])
        response = api.client.post(url, content=two, headers={"Content-Encoding": "gzip"})
        assert response.status_code == 200, response.text
        cut = gzip.compress(body)[:-12]
        response = api.client.post(url, content=cut, headers={"Content-Encoding": "gzip"})
        assert response.status_code == 400 and "not valid gzip" in response.json()["error"]

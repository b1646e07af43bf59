"""The S3 artifact store against a real S3 HTTP server on 127.0.0.1 (moto's standalone server, from
the dev extra): atomic puts, a local cache checked by ETag, prefix deletes, readiness, and two
service instances that share nothing but the bucket and the database serving each other's uploads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.settings import Settings
from app.storage import open_store
from app.storage.s3 import S3ArtifactStore, StorageConfigError, parse_s3_url
from tests import models

boto3 = pytest.importorskip("boto3", reason="boto3 (the s3 extra) is not installed")
pytest.importorskip("moto.server", reason="moto[server] (dev extra) runs the local S3 server")


def _start_moto() -> tuple[str, subprocess.Popen] | None:
    """moto's server on a port found free; None when another process took the port before moto bound it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while server.poll() is None:
        try:  # S3's ListBuckets answer: moto itself, not whatever else may listen on the port
            if "ListAllMyBucketsResult" in httpx.get(endpoint, timeout=1).text:
                return endpoint, server
        except httpx.TransportError:
            pass
        if time.monotonic() >= deadline:
            server.kill()
            raise AssertionError("moto server did not start within 30 s")
        time.sleep(0.1)
    return None  # it exited: its port was taken


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    for _ in range(3):
        started = _start_moto()
        if started is not None:
            break
    else:
        raise AssertionError("moto server exited at start 3 times")
    endpoint, server = started
    try:
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """boto3's own configuration pointed at the local server (the worker subprocess inherits it); a fresh bucket."""
    for name, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    bucket = f"b{os.urandom(6).hex()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_url_parsing_and_refusals() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b/")
    with pytest.raises(StorageConfigError, match=r"not s3://bucket\[/prefix\]"):
        parse_s3_url("s3:///nobucket")
    with pytest.raises(StorageConfigError, match="use s3://bucket/prefix"):
        open_store(Settings(storage_url="gs://elsewhere"))


def test_put_fetch_cache_delete_and_check(s3_env: str, tmp_path: Path) -> None:
    store = S3ArtifactStore(f"s3://{s3_env}/deploy", tmp_path / "cache")
    key = "models/m/1/original.onnx"
    source = _file(tmp_path / "upload", b"first")
    store.put_file(key, source, move=True)
    assert not source.exists()
    listed = store.client.list_objects_v2(Bucket=s3_env)["Contents"]
    assert [item["Key"] for item in listed] == [f"deploy/{key}"]  # under the prefix
    assert store.exists(key) and not store.exists("models/m/1/report.json")

    fetched = store.fetch(key)
    assert fetched.read_bytes() == b"first"
    fetched.write_bytes(b"local")  # the cached copy is reused while the object is unchanged ...
    assert store.fetch(key).read_bytes() == b"local"
    other = S3ArtifactStore(f"s3://{s3_env}/deploy", tmp_path / "other-cache")  # ... another replica
    other.put_file(key, _file(tmp_path / "again", b"second"))
    assert store.fetch(key).read_bytes() == b"second"  # ... and downloaded again once it changed

    with pytest.raises(FileNotFoundError):
        store.fetch("models/m/2/original.onnx")
    with pytest.raises(ValueError, match="leaves the store"):
        store.fetch("../escape")

    store.put_file("models/m/2/original.onnx", _file(tmp_path / "v2", b"v2"))
    store.delete_prefix("models/m/1/")
    assert not store.exists(key) and not (tmp_path / "cache" / "models/m/1").exists()
    assert store.exists("models/m/2/original.onnx")
    store.check()
    with pytest.raises(OSError, match="cannot be written"):
        S3ArtifactStore("s3://no-such-bucket-here", tmp_path / "c3").check()


def test_replicas_sharing_only_the_bucket_serve_each_others_uploads(s3_env: str, serve, tmp_path: Path) -> None:  # noqa: ANN001
    shared = {"storage_url": f"s3://{s3_env}/svc", "database_url": f"sqlite:///{tmp_path / 'shared.db'}"}
    model = models.mlp()
    feed = models.random_feed(model)
    with serve(data_dir=tmp_path / "replica-a", **shared) as a:
        job = a.wait(a.upload(model, name="m").json()["job_id"])
        assert job["status"] == "succeeded", job
        expected = np.asarray(a.predict("m", feed).json()["outputs"]["logits"])
    assert not (tmp_path / "replica-b").exists()
    with serve(data_dir=tmp_path / "replica-b", run_worker=False, **shared) as b:
        response = b.predict("m", feed)
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(np.asarray(response.json()["outputs"]["logits"]), expected)
        assert b.client.get("/readyz").json()["storage"] == "ok"
    assert list((tmp_path / "replica-b" / "cache" / "artifacts" / "models" / "m" / "1").glob("*.onnx"))

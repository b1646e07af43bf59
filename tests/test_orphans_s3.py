"""The S3 store lists the versions it holds (under its prefix only), for the worker's sweep of orphaned files."""

from __future__ import annotations

from pathlib import Path

from app.storage.s3 import S3ArtifactStore
from tests.test_s3_store import s3_endpoint, s3_env  # noqa: F401 - the local S3 server's fixtures


def test_stored_versions_lists_each_version_once_under_the_prefix(s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    store = S3ArtifactStore(f"s3://{s3_env}/deploy/", tmp_path / "cache")
    other = S3ArtifactStore(f"s3://{s3_env}/elsewhere/", tmp_path / "other")
    for owner, key in ((store, "models/m/1/original.onnx"), (store, "models/m/1/report.json"),
                       (store, "models/m/12/original.onnx"), (store, "models/x/1/original.onnx"),
                       (other, "models/n/1/original.onnx")):
        source = tmp_path / "file"
        source.write_bytes(b"x")
        owner.put_file(key, source)
    listed = store.stored_versions()
    assert sorted(listed) == [("m", 1), ("m", 12), ("x", 1)]
    assert all(when > 1.7e9 for when in listed.values())
    store.delete_prefix("models/m/1/")
    assert sorted(store.stored_versions()) == [("m", 12), ("x", 1)]

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


def test_a_replica_prunes_its_cached_copies_of_versions_deleted_through_another(s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    url = f"s3://{s3_env}/svc/"
    a = S3ArtifactStore(url, tmp_path / "a", cache_keep_s=0)
    b = S3ArtifactStore(url, tmp_path / "b")
    fresh = S3ArtifactStore(url, tmp_path / "fresh")  # the default: copies written in the last 10 minutes stay
    for number in (1, 2, 3):
        source = tmp_path / "upload"
        source.write_bytes(b"x" * 1000)
        a.put_file(f"models/m/{number}/original.onnx", source, move=True)  # a keeps what it stored
        fresh.fetch(f"models/m/{number}/original.onnx")
    if a._pruning is not None:
        a._pruning.join()
    cached = sorted(p.parent.name for p in (tmp_path / "a").glob("models/m/*/original.onnx"))
    assert cached == ["1", "2", "3"]

    b.delete_prefix("models/m/1/")  # deleted through the other replica: a's copy stayed
    assert a.prune_cache() == [("m", 1)]
    assert not (tmp_path / "a" / "models/m/1").exists() and (tmp_path / "a" / "models/m/2/original.onnx").is_file()
    assert fresh.prune_cache() == [] and (tmp_path / "fresh" / "models/m/1/original.onnx").is_file()

    b.delete_prefix("models/m/2/")
    a.fetch("models/m/3/original.onnx")  # a fetch (or a store) prunes in the background, now and then
    a._pruning.join()
    assert sorted(p.parent.name for p in (tmp_path / "a").glob("models/m/*/original.onnx")) == ["3"]

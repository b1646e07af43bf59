"""Artifacts in an S3-compatible bucket (`ONNXFORGE_STORAGE_URL=s3://bucket/prefix`), for clusters
whose replicas share no filesystem. Needs the `s3` extra (boto3).

S3 writes are atomic per object, so `put_file` is one upload. Readers need a local file (ONNX
Runtime loads paths), so `fetch` downloads into a local cache once and reuses it while the object's
ETag is unchanged: a version deleted and re-created under the same number is downloaded again, not
served stale. Copies of versions the bucket no longer holds (deleted through another replica, retired
by a worker) are removed from the cache now and then (`prune_cache`). Credentials, region and a non-AWS
endpoint come from boto3's own configuration (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, ~/.aws).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from app.errors import ServiceError
from app.storage.base import ArtifactStore, make_folder, parse_version_key, remove_empty_parents

log = logging.getLogger("onnxforge.storage")

# How often (at most) the local cache is pruned, and how long a cached version is left alone after it was written.
CACHE_KEEP_S = 600.0


class StorageConfigError(ServiceError):
    """ONNXFORGE_STORAGE_URL names a store this installation cannot open."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> (`bucket`, `some/prefix/`); the prefix may be empty."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise StorageConfigError(f"ONNXFORGE_STORAGE_URL={url!r} is not s3://bucket[/prefix]")
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _is_missing(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")


class S3ArtifactStore(ArtifactStore):
    def __init__(self, url: str, cache_dir: Path, client: Any = None,  # noqa: ANN401 - a boto3 S3 client
                 cache_keep_s: float = CACHE_KEEP_S) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        if client is None:
            try:
                import boto3
            except ImportError as exc:
                raise StorageConfigError(
                    f"ONNXFORGE_STORAGE_URL={url!r} needs boto3: pip install 'onnxforge[s3]'") from exc
            client = boto3.client("s3")
        self.client = client
        self.cache = Path(cache_dir).resolve()
        self.cache.mkdir(parents=True, exist_ok=True)
        self.cache_keep_s = cache_keep_s
        self._pruned_at = time.monotonic()
        self._pruning: threading.Thread | None = None

    def _object(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"artifact key {key!r} leaves the store")
        return self.prefix + key

    def _cached(self, key: str) -> Path:
        self._object(key)  # validates the key
        return self.cache / key

    def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        self._prune_now_and_then()
        self.client.upload_file(str(source), self.bucket, self._object(key))
        # Keep what was just written as the local copy; fetch checks its ETag before trusting it.
        target = self._cached(key)
        make_folder(target.parent)
        (target.parent / f".{target.name}.etag").unlink(missing_ok=True)
        if move:
            shutil.move(str(source), target)
        else:
            target.unlink(missing_ok=True)

    def fetch(self, key: str) -> Path:
        self._prune_now_and_then()
        try:
            etag = self.client.head_object(Bucket=self.bucket, Key=self._object(key))["ETag"]
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(key) from exc
            raise
        target = self._cached(key)
        etag_file = target.parent / f".{target.name}.etag"
        if target.is_file() and etag_file.is_file() and etag_file.read_text() == etag:
            return target
        make_folder(target.parent)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.client.download_file(self.bucket, self._object(key), str(temporary))
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        etag_file.write_text(etag)
        return target

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except Exception as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    def delete_prefix(self, prefix: str) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                       Prefix=self._object(prefix))
        for page in pages:
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:  # a page holds at most 1000 keys, which is delete_objects' limit too
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        local = self._cached(prefix.rstrip("/"))
        if local.is_dir():
            shutil.rmtree(local, ignore_errors=True)
        else:
            local.unlink(missing_ok=True)
        remove_empty_parents(local, self.cache)

    def stored_versions(self) -> dict[tuple[str, int], float]:
        found: dict[tuple[str, int], float] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                       Prefix=self._object("models/"))
        for page in pages:
            for item in page.get("Contents", []):
                version = parse_version_key(item["Key"][len(self.prefix):])
                if version is not None:
                    found[version] = max(found.get(version, 0.0), item["LastModified"].timestamp())
        return found

    def prune_cache(self) -> list[tuple[str, int]]:
        """Remove the cached copies of versions the bucket no longer holds, untouched for `cache_keep_s`; returns
        their (name, version).

        WHY: every replica caches each version it stored or served, but a delete removes the cached copies of the
        replica it went through only: the others kept theirs for good, filling their disks with deleted models.
        The age guard leaves alone a version being stored just now, whose object the listing may predate.
        """
        stored = self.stored_versions()
        cutoff = time.time() - self.cache_keep_s
        removed = []
        for folder in sorted(self.cache.glob("models/*/*")):
            version = parse_version_key(f"{folder.relative_to(self.cache).as_posix()}/")
            if version is None or version in stored:
                continue
            try:
                written = max((p.lstat().st_mtime for p in folder.rglob("*")), default=folder.lstat().st_mtime)
            except FileNotFoundError:
                continue
            if written <= cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                remove_empty_parents(folder, self.cache)
                removed.append(version)
        if removed:
            log.info("removed the cached copies of %d versions deleted from the bucket: %s", len(removed),
                     ", ".join(f"{name} v{number}" for name, number in removed[:5]) + (", ..." if len(removed) > 5
                                                                                       else ""))
        return removed

    def _prune_now_and_then(self) -> None:
        """`prune_cache` in the background, at most every `cache_keep_s`: listing a large bucket takes seconds."""
        if time.monotonic() - self._pruned_at < self.cache_keep_s:
            return
        self._pruned_at = time.monotonic()
        self._pruning = threading.Thread(target=self._prune_quietly, name="s3-cache-prune", daemon=True)
        self._pruning.start()

    def _prune_quietly(self) -> None:
        try:
            self.prune_cache()
        except Exception as exc:  # noqa: BLE001 - botocore's errors are not OSErrors; tried again later
            log.warning("could not prune the S3 cache %s: %s", self.cache, exc)

    def check(self) -> None:
        probe = self._object(f".ready/{uuid.uuid4().hex}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except Exception as exc:  # noqa: BLE001 - botocore's errors do not derive from OSError
            raise OSError(f"s3://{self.bucket}/{self.prefix} cannot be written: {exc}") from exc

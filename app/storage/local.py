"""Artifacts in a local (or shared, mounted) folder, written temp-then-rename."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from app.errors import StorageError
from app.storage.base import (
    ArtifactStore,
    make_folder,
    parse_version_key,
    remove_empty_parents,
    storage_errors,
)


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"artifact key {key!r} leaves the store")
        return path

    def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        target = self._path(key)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        with storage_errors(f"while storing {key}"):
            make_folder(target.parent)
            try:
                if move:
                    # A rename when source and store share a filesystem (uploads do); a copy otherwise.
                    shutil.move(str(source), temporary)
                else:
                    shutil.copyfile(source, temporary)
                with open(temporary, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.replace(temporary, target)
            finally:
                if os.path.lexists(temporary):  # an unlink of nothing on a read-only disk fails too
                    temporary.unlink()

    def fetch(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        reasons: list[OSError] = []
        if path.is_dir():
            shutil.rmtree(path, onerror=lambda _function, _path, info: reasons.append(info[1]))
        elif path.is_file():
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                reasons.append(exc)
        remove_empty_parents(path, self.root)
        # WHY raise rather than return a warning: every caller (a delete, an upload or a job undoing itself) has
        # already let go of the version, so the files are orphans; a 200 here was read as "space freed" while they
        # stayed, silently, until the disk filled. The error names them and why, and the caller's answer says so.
        left = [p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file()]
        if left:
            reason = next((r for r in reasons if r.errno != errno.ENOENT), None)
            why = (reason.strerror or str(reason)) if reason is not None else "unknown"
            raise StorageError(
                f"the files under {prefix} could not be removed from the artifact store ({why}): {len(left)} file(s) "
                "stayed on the server's disk, though no version uses them any more; remove them once the store "
                "(ONNXFORGE_DATA_DIR/artifacts) is writable",
                reason.errno if reason is not None else None)

    def stored_versions(self) -> dict[tuple[str, int], float]:
        found: dict[tuple[str, int], float] = {}
        for path in (self.root / "models").glob("*/*/*"):
            version = parse_version_key(path.relative_to(self.root).as_posix())
            try:
                if version is not None:
                    found[version] = max(found.get(version, 0.0), path.lstat().st_mtime)
            except FileNotFoundError:  # removed meanwhile
                continue
        return found

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.root).free

    def check(self) -> None:
        probe = self.root / f".ready-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()

"""What an artifact store must do, so that a local folder and an S3 bucket are interchangeable.

Keys are relative POSIX paths: `models/<name>/<version>/<file>`. Writers hand over a finished local
file (`put_file`), never a stream, so every store can make the write atomic: readers see the whole
artifact or nothing. Readers ask for a local path (`fetch`): a remote store downloads into a local
cache once, which is what ONNX Runtime and file downloads need anyway.
"""

from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.errors import StorageError

ORIGINAL = "original.onnx"
OPTIMIZED = "optimized.onnx"
CALIBRATION = "calibration.npz"
REPORT = "report.json"


def artifact_key(name: str, version: int, filename: str) -> str:
    return f"models/{name}/{version}/{filename}"


def version_prefix(name: str, version: int) -> str:
    return f"models/{name}/{version}/"


# How often make_folder creates a folder again when a delete removed an empty parent under it meanwhile: each retry
# needs a delete to hit a window of two mkdir calls, so a handful is plenty.
_FOLDER_ATTEMPTS = 20


def make_folder(folder: Path) -> None:
    """`mkdir -p` that a concurrent delete cannot make fail.

    A delete removes a model's folder once empty (`remove_empty_parents`); `mkdir(parents=True)` creates each missing
    folder in turn, so a delete of the same name (its last versions, or a failed upload undoing itself), here or on
    another replica, can remove `models/<name>/` between two of its calls: the upload then failed with
    FileNotFoundError, a 500. Once the version's folder exists it is safe: deletes remove empty folders only, and never
    a version folder but their own.
    """
    for _ in range(_FOLDER_ATTEMPTS - 1):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            continue
    folder.mkdir(parents=True, exist_ok=True)


def remove_empty_parents(path: Path, root: Path) -> None:
    """Remove `path`'s parent folders up to (not including) `root` while they are empty: once a model's last
    version is deleted, its `models/<name>/` folder goes too instead of staying behind, empty, forever.
    `rmdir` removes empty folders only, so another version's files, or an upload writing into the folder
    meanwhile, stop it; it never looks at a sibling (another model's folder)."""
    for folder in path.parents:
        if folder == root or not folder.is_relative_to(root):
            return
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone
            return


# The errors that mean "this server cannot write here", whatever the request: a quota counts as a full disk.
_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def storage_failure(exc: OSError, doing: str) -> StorageError | None:
    """The StorageError (507) that says in words what `exc` means for the client, or None when `exc` is not about
    the server's disk (a missing file, a bad path: those stay what they are). `doing`: "while ..."."""
    if isinstance(exc, StorageError):
        return exc
    if exc.errno in _FULL:
        return StorageError(f"the server's disk is full ({exc.strerror}) {doing}: nothing of it was kept and the "
                            "versions already stored are unchanged; send it again once space is freed in the server's "
                            "data folder (ONNXFORGE_DATA_DIR)", exc.errno)
    if exc.errno in _NOT_WRITABLE:
        return StorageError(f"the server's storage is not writable ({exc.strerror}) {doing}: nothing of it was kept "
                            "and the versions already stored are unchanged; send it again once the server's data "
                            "folder (ONNXFORGE_DATA_DIR) is writable", exc.errno)
    return None


@contextmanager
def storage_errors(doing: str) -> Iterator[None]:
    """Raise a full or read-only disk met inside the block as a StorageError saying so (one log line and a 507),
    not as an OSError that became `internal error (OSError)`, a 500 with its traceback."""
    try:
        yield
    except OSError as exc:
        failure = storage_failure(exc, doing)
        if failure is None or failure is exc:
            raise
        raise failure from None


class ArtifactStore(ABC):
    @abstractmethod
    def put_file(self, key: str, source: Path, *, move: bool = False) -> None:
        """Store a finished local file under `key` atomically; `move` may consume the source."""

    @abstractmethod
    def fetch(self, key: str) -> Path:
        """A local path holding the artifact. Raises FileNotFoundError if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every artifact whose key starts with `prefix` (a version's folder). Raises StorageError when
        some stay (a read-only store): a delete must not look done while its files are still there."""

    @abstractmethod
    def check(self) -> None:
        """Raise OSError if the store cannot be written right now (readiness)."""

    def free_bytes(self) -> int | None:
        """Space left for artifacts on this server's disk; None when the store does not live on it (a bucket)."""
        return None

    @abstractmethod
    def stored_versions(self) -> dict[tuple[str, int], float]:
        """Every (name, version) with files in the store, and when the newest of them was written (Unix time):
        finding the folders no version owns any more (a crash between a delete's commit and its file removal, an
        upload cut off between storing its files and committing its version)."""


def parse_version_key(key: str) -> tuple[str, int] | None:
    """(name, version) of a key under models/<name>/<version>/, None for any other key."""
    parts = key.split("/")
    if len(parts) < 4 or parts[0] != "models" or not (parts[2].isascii() and parts[2].isdigit()):
        return None
    return parts[1], int(parts[2])

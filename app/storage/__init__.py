"""Artifacts (uploaded models, calibration sets, optimized models, reports), addressed by key."""

from app.storage.base import ArtifactStore, artifact_key
from app.storage.local import LocalArtifactStore

__all__ = ["ArtifactStore", "LocalArtifactStore", "artifact_key", "open_store"]


def open_store(settings) -> ArtifactStore:  # noqa: ANN001 - app.settings.Settings (kept import-light)
    """The store the settings ask for: the local (or shared, mounted) folder, or an S3 bucket."""
    url = settings.storage_url
    if url and url.startswith("s3://"):
        from app.storage.s3 import S3ArtifactStore  # boto3 only when asked for

        # Each replica keeps its own local copies of what it loaded (ONNX Runtime needs files).
        return S3ArtifactStore(url, settings.data_dir / "cache" / "artifacts")
    if url:
        from app.storage.s3 import StorageConfigError

        raise StorageConfigError(f"ONNXFORGE_STORAGE_URL={url!r}: use s3://bucket/prefix, or leave it unset for "
                                 f"the folder {settings.artifacts_dir}")
    return LocalArtifactStore(settings.artifacts_dir)

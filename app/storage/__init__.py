"""Artifacts (uploaded models, calibration sets, optimized models, reports), addressed by key."""

from app.storage.base import ArtifactStore, artifact_key
from app.storage.local import LocalArtifactStore

__all__ = ["ArtifactStore", "LocalArtifactStore", "artifact_key", "open_store"]


def open_store(settings) -> ArtifactStore:  # noqa: ANN001 - app.settings.Settings (kept import-light)
    """The store the settings ask for. Only the local folder exists today; an S3 store plugs in here."""
    return LocalArtifactStore(settings.artifacts_dir)

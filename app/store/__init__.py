"""The metadata store: model versions and jobs in SQLite (default) or PostgreSQL, one code path."""

from app.store.db import Database
from app.store.tables import Base, Job, ModelVersion, WorkerBeat, utcnow

__all__ = ["Base", "Database", "Job", "ModelVersion", "WorkerBeat", "utcnow"]

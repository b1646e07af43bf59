"""The tables: model versions (what was uploaded, its status and report), jobs (the queue) and the
workers' heartbeats (who is there to run the queue).

Times are naive UTC datetimes: SQLite drops time zones, and one convention for both databases keeps
lease comparisons in SQL simple.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime()}


class ModelVersion(Base):
    """One uploaded version of a named model.

    `id` is unique forever (caches key on it); version numbers are never reused, because deleted
    versions stay as tombstones (status "deleted") so that a stale cache can never mistake a new
    upload for an old one.
    """

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))  # optimizing | ready | failed (see `unrunnable`) | deleted
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(default=None)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)
    filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    has_calibration: Mapped[bool] = mapped_column(default=False)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)  # what the user asked the optimizer for
    inputs: Mapped[list[Any]] = mapped_column(default=list)  # [{name, dtype, shape}] of the original
    outputs: Mapped[list[Any]] = mapped_column(default=list)
    notes: Mapped[list[Any]] = mapped_column(default=list)  # what validation had to change
    selected: Mapped[str | None] = mapped_column(String(64), default=None)  # the optimizer's chosen variant
    provider: Mapped[str | None] = mapped_column(String(16), default=None)  # what the worker measured on
    report: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    # How this version is served, given at upload: {"batch_max_size": int, "batch_max_delay_ms": float},
    # each optional (the service's defaults otherwise). Added after the first release: see ADDED_COLUMNS.
    serving: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # Set on the one live version of a name that an admin pinned to serve it (rollback), None on the others;
    # in the database, not in a process, so every replica reads it with the version list. See ADDED_COLUMNS.
    pinned_at: Mapped[datetime | None] = mapped_column(default=None)
    # True on a failed version whose job proved that ONNX Runtime cannot run the uploaded model itself (it failed on
    # the model's own fixed input shapes): it is never served (Registry's pick_serving). None (not False) elsewhere,
    # as on the rows of a database made before this column existed. See ADDED_COLUMNS.
    unrunnable: Mapped[bool | None] = mapped_column(default=None)


# Columns added to existing tables after the first release: create_all makes missing tables only, so
# Database.create_schema adds these to a database made by an older release (all nullable).
ADDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("model_versions", "serving"), ("model_versions", "pinned_at"), ("model_versions", "unrunnable"),
)


class Job(Base):
    """One optimization of one model version; the queue is the rows with status "queued".

    A running job carries a lease that its worker renews; a job whose lease expired lost its worker
    and is queued again or failed (see JobQueue.recover_lost).
    """

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued | running | succeeded | failed
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(128), default=None)
    runner_pid: Mapped[int | None] = mapped_column(Integer, default=None)  # the optimizer child process
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)


class WorkerBeat(Base):
    """One optimizer worker's heartbeat, written every few seconds whether it has work or not.

    WHY: an API process started with `--no-worker` (or an `onnxforge worker` that died) cannot see
    whether anything will ever run the queue; jobs would sit "queued" with every health check green.
    /readyz counts the workers seen lately from these rows.
    """

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # the worker id (host:pid:nonce)
    running: Mapped[int] = mapped_column(Integer, default=0)  # jobs it was running at its last beat
    last_seen: Mapped[datetime] = mapped_column(default=utcnow, index=True)

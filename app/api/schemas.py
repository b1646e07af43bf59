"""Request and response bodies of /v1 (they are also the OpenAPI schema at /docs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.store import Job, ModelVersion


def utc(value: datetime | None) -> datetime | None:
    """The store keeps naive UTC; answers carry the zone."""
    return value.replace(tzinfo=UTC) if value is not None else None


class ErrorOut(BaseModel):
    error: str


class UploadAccepted(BaseModel):
    name: str
    version: int
    job_id: str
    status_url: str
    warnings: list[str] = Field(default_factory=list, description="e.g. the inputs/outputs differ from the version "
                                                                  "serving now (also in the version's notes)")
    removed_versions: list[int] = Field(
        default_factory=list, description="older versions of the model this upload deleted (files and report) under "
                                          "ONNXFORGE_KEEP_VERSIONS; the serving and pinned versions are never removed",
    )


class JobOut(BaseModel):
    id: str
    model: str
    version: int
    status: Literal["queued", "running", "succeeded", "failed"]
    stage: str | None = Field(description="validate, fuse, calibrate, quantize, evaluate, benchmark")
    progress: float
    error: str | None
    attempts: int = Field(description="runs counted against ONNXFORGE_JOB_MAX_ATTEMPTS; a run stopped by a worker "
                                      "shutdown is not counted")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker_lost: str | None = Field(
        default=None, description="while running: set when the job's worker stopped beating (crashed, killed, cut "
                                  "off), saying when it was last heard and when the job is retried or fails")

    @classmethod
    def of(cls, job: Job, worker_lost: str | None = None) -> JobOut:
        return cls(id=job.id, model=job.name, version=job.version, status=job.status, stage=job.stage,
                   progress=round(job.progress, 4), error=job.error, attempts=job.attempts,
                   created_at=utc(job.created_at), started_at=utc(job.started_at), finished_at=utc(job.finished_at),
                   worker_lost=worker_lost)


class TensorOut(BaseModel):
    name: str
    dtype: str | None
    shape: list[int | str | None] | None = Field(description="null or a name for a dynamic dimension")


class VersionOut(BaseModel):
    version: int
    status: Literal["optimizing", "ready", "failed"] = Field(
        description="failed: the optimization failed (`error` says why); the version serves its validated original "
                    "unless `servable` is false"
    )
    servable: bool = Field(default=True, description="false when its job proved ONNX Runtime cannot run the uploaded "
                                                     "model: it never serves and cannot be pinned (`error` says why)")
    created_at: datetime
    ready_at: datetime | None
    filename: str
    sha256: str
    size_bytes: int
    has_calibration: bool
    options: dict[str, Any]
    selected: str | None = Field(description="the optimizer's chosen variant (e.g. int8_static); null until ready")
    provider: str | None = Field(description="the provider the worker measured on")
    error: str | None
    notes: list[str]
    batching: dict[str, int | float] = Field(
        default_factory=dict, description="this version's own batching settings given at upload (batch_max_size, "
                                          "batch_max_delay_ms); the service's defaults apply to the others",
    )
    job: JobOut | None

    @classmethod
    def of(cls, row: ModelVersion, job: Job | None, worker_lost: str | None = None) -> VersionOut:
        return cls(version=row.version, status=row.status, created_at=utc(row.created_at), ready_at=utc(row.ready_at),
                   filename=row.filename, sha256=row.sha256, size_bytes=row.size_bytes,
                   has_calibration=row.has_calibration, options=row.options or {}, selected=row.selected,
                   provider=row.provider, error=row.error, notes=list(row.notes or []),
                   batching=dict(row.serving or {}), job=JobOut.of(job, worker_lost) if job is not None else None,
                   servable=not row.unrunnable)


class ModelSummary(BaseModel):
    name: str
    serving_version: int | None
    pinned_version: int | None = Field(default=None, description="the version pinned to serve (rollback); null: "
                                                                 "the newest ready version serves")
    serving_variant: Literal["optimized", "original"] | None
    latest_version: int
    latest_status: str = Field(description="queued | optimizing | ready | failed (its optimization; it still serves "
                                           "its original unless its model cannot run at all)")
    versions: int


class ModelOut(BaseModel):
    name: str
    serving_version: int | None = Field(description="what predict without a version serves: the pinned version, "
                                                    "else the newest ready one, else (none ready) the oldest live "
                                                    "one (its validated original); null if none can")
    serving_variant: Literal["optimized", "original"] | None
    pinned_version: int | None = Field(default=None, description="the version pinned to serve by PUT /v1/models/"
                                                                 "{name}/serving (rollback); null: the rule decides")
    provider: str = Field(description="what the serving session runs on (read back from ONNX Runtime once loaded)")
    batching_note: str | None = Field(default=None, description="once it served: why the serving session is not "
                                      "batched although its upload asked for batching (no batch axis, the probe "
                                      "found it does not pay) or whatever its settings say (its rows would depend "
                                      "on each other)")
    inputs: list[TensorOut]
    outputs: list[TensorOut]
    versions: list[VersionOut]


class ServingPinIn(BaseModel):
    version: int = Field(ge=1, description="a ready version, or a failed one whose model runs (it serves its "
                                           "validated original)")


class ServingOut(BaseModel):
    name: str
    serving_version: int | None
    pinned_version: int | None = Field(description="null: the newest ready version serves")


class PredictIn(BaseModel):
    inputs: dict[str, Any] = Field(description='{"<input name>": nested list or number}; dtypes come from the model')
    variant: Literal["optimized", "original"] | None = Field(
        default=None, description="a field of the body, not a query parameter: default "
                                  "optimized once ready, the validated original until then (and for good when the "
                                  "optimizer found nothing faster: the answer's variant says which served)"
    )

    model_config = {"extra": "forbid", "json_schema_extra": {"example": {"inputs": {"features": [[0.1, 0.2, 0.3]]}}}}


class PredictOut(BaseModel):
    model: str
    version: int
    variant: Literal["optimized", "original"]
    outputs: dict[str, Any] = Field(description="nested lists; NaN and infinities as null")

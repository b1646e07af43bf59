"""/v1/jobs: the status of an optimization."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.deps import services_of
from app.api.schemas import ErrorOut, JobOut
from app.services.container import Services

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobOut, responses={404: {"model": ErrorOut}})
def get_job(job_id: str, services: Services = Depends(services_of)) -> JobOut:
    """Status (queued, running, succeeded, failed), the stage running, progress 0..1, the error if any, and, while
    running, whether its worker was lost (worker_lost)."""
    job = services.jobs.get(job_id)
    return JobOut.of(job, worker_lost=services.jobs.lost_worker(job))

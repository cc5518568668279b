"""Labeling jobs over REST (docs/jobs.md):

  POST   /v1/jobs                a dataset under the data root → 202 + job id
  GET    /v1/jobs                recent jobs
  GET    /v1/jobs/{id}           state, counts, per-case errors, rate, times
  DELETE /v1/jobs/{id}           cancel (finished outputs stay)
  GET    /v1/jobs/{id}/ranking   cases from least to most trusted

The ingress only validates, writes the job's state to Redis and asks Ray for the job's runner actor
(`IngressState.launch_job`, by default `services.labeling.job_actor.launch`); the work happens in that
actor, wherever Ray places it. Paths from clients must resolve (symlinks followed) under `data_root`;
outputs go under `job_output_root/<job id>`.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from services.ingress.errors import bad, error_responses
from services.ingress.state import IngressState, get_state
from shared.jobs import FINAL, JobSpec, JobState, list_jobs, load_job, new_job_id, request_cancel, save_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

TEXT = {
    400: "Bad input (a path outside the data root, a bad case id or class); `detail` says what",
    401: "Missing or invalid bearer token (when VESSA_API_TOKEN is set)",
    404: "No such job or dataset directory, or jobs are off on this service",
    409: "The job has not ended yet (its ranking is written when it does)",
    503: "The job runner could not be started",
}


class JobCreated(BaseModel):
    job_id: str
    state: str
    data: str
    out: str


class JobList(BaseModel):
    jobs: list[JobState]


class Ranking(BaseModel):
    job_id: str
    state: str
    ranking: list[dict]


def confine(path: str, root: str) -> Path:
    """`path` (relative to `root`, or absolute) resolved with symlinks followed; a 400 unless it lies
    inside `root`, a 404 unless it is a directory."""
    if "\x00" in path:
        raise bad("the path holds a NUL byte")
    base = Path(root).resolve()
    candidate = Path(path)
    full = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if not full.is_relative_to(base):
        raise bad(f"the dataset path must lie under the data root ({path!r} does not)")
    if not full.is_dir():
        raise bad(f"no dataset directory {path!r} under the data root", 404)
    return full


def _accepted(body: JobSpec, job_id: str, state: IngressState) -> JobSpec:
    """The client's spec with its paths decided by the service: data confined to the data root, out
    under the job output root."""
    if body.out is not None:
        raise bad("out is chosen by the service (job_output_root/<job id>): leave it out")
    settings = state.settings
    out_root = Path(settings.job_output_root or Path(settings.data_root) / "vessa-labels").resolve()
    if body.dicomweb is not None:
        if body.data:
            raise bad("give data (a dataset directory) or dicomweb (a study on a PACS), not both")
        allowed = [p.strip().rstrip("/") for p in settings.dicomweb_allowed.split(",") if p.strip()]
        if not any(body.dicomweb.url == p or body.dicomweb.url.startswith(p + "/") for p in allowed):
            raise bad("this DICOMweb URL is not one the service may read (VESSA_DICOMWEB_ALLOWED)")
        out = out_root / job_id
        return body.model_copy(update={"data": str(out / "dicomweb" / body.dicomweb.study), "out": str(out)})
    data = confine(body.data, settings.data_root)
    return body.model_copy(update={"data": str(data), "out": str(out_root / job_id)})


def _job_id(job_id: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{12}", job_id):
        raise bad("no such job", 404)
    return job_id


async def load_or_404(job_id: str, state: IngressState) -> JobState:
    job = await asyncio.to_thread(load_job, state.redis(), _job_id(job_id))
    if job is None:
        raise bad("no such job", 404)
    return job


@router.post("", status_code=202, response_model=JobCreated, summary="Start a labeling job", responses=error_responses(TEXT, 400, 401, 404, 503))
async def create_job(body: JobSpec, state: IngressState = Depends(get_state)) -> JobCreated:
    r = state.redis()
    job_id = new_job_id()
    spec = _accepted(body, job_id, state)
    job = JobState(job_id=job_id, spec=spec)
    await asyncio.to_thread(save_job, r, job)
    try:
        await asyncio.to_thread(state.launch_job, job_id, state.settings.redis_url)
    except Exception as exc:
        job.state, job.error = "failed", f"the job runner could not be started: {exc}"
        await asyncio.to_thread(save_job, r, job)
        raise bad(job.error, 503) from None
    return JobCreated(job_id=job_id, state=job.state, data=spec.data, out=spec.out)


@router.get("", response_model=JobList, summary="Recent labeling jobs (newest first)", responses=error_responses(TEXT, 400, 401, 404))
async def get_jobs(limit: int = 100, state: IngressState = Depends(get_state)) -> JobList:
    if not 1 <= limit <= 1000:
        raise bad("limit must lie in 1..1000")
    jobs = await asyncio.to_thread(list_jobs, state.redis(), limit)
    for j in jobs:
        j.ranking = None  # the list stays small; the ranking has its own route
    return JobList(jobs=jobs)


@router.get("/{job_id}", response_model=JobState, summary="A job's state, counts, errors and rate", responses=error_responses(TEXT, 401, 404))
async def get_job(job_id: str, state: IngressState = Depends(get_state)) -> JobState:
    job = await load_or_404(job_id, state)
    job.ranking = None
    return job


@router.delete("/{job_id}", status_code=202, response_model=JobState, summary="Cancel a job (finished outputs stay)", responses=error_responses(TEXT, 401, 404))
async def cancel_job(job_id: str, state: IngressState = Depends(get_state)) -> JobState:
    r = state.redis()
    job = await load_or_404(job_id, state)
    if job.state not in FINAL:
        await asyncio.to_thread(request_cancel, r, job.job_id)
    job.ranking = None
    return job


@router.get("/{job_id}/ranking", response_model=Ranking, summary="Cases from least to most trusted", responses=error_responses(TEXT, 401, 404, 409))
async def job_ranking(job_id: str, state: IngressState = Depends(get_state)) -> Ranking:
    job = await load_or_404(job_id, state)
    if job.ranking is None:
        raise bad(f"the job is {job.state}: its ranking is written when it ends", 409)
    return Ranking(job_id=job.job_id, state=job.state, ranking=job.ranking)

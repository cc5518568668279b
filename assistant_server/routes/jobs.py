"""Labeling jobs over REST (docs/jobs.md):

  POST   /v1/jobs                a dataset under the data root → 202 + job id
  GET    /v1/jobs                recent jobs
  GET    /v1/jobs/{id}           state, counts, per-case errors, rate, times
  DELETE /v1/jobs/{id}           cancel (finished outputs stay)
  GET    /v1/jobs/{id}/ranking   cases from least to most trusted

The ingress only validates, writes the job's state to Redis and asks Ray for the job's runner actor
(`job_runner`, default `services.labeling.job_actor:launch`); the work happens in that actor, wherever
Ray places it. Paths from clients must resolve (symlinks followed) under `data_root`; outputs go under
`job_output_root/<job id>`.
"""

from __future__ import annotations

import asyncio
import importlib
import re
from pathlib import Path
from typing import Literal

import redis
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from shared.job_state import (
    FINAL,
    JobSpec,
    JobState,
    list_jobs,
    load_job,
    new_job_id,
    request_cancel,
    save_job,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_CASE_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class JobsConfig(BaseModel):
    """What the job routes need from the ingress settings."""

    redis_url: str | None = None
    data_root: str | None = None
    job_output_root: str | None = None
    job_runner: str = "services.labeling.job_actor:launch"


CONFIG = JobsConfig()


def configure(**settings) -> None:
    global CONFIG
    CONFIG = JobsConfig(**{k: v for k, v in settings.items() if k in JobsConfig.model_fields})


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(min_length=1, max_length=1024, description="dataset directory, relative to the data root (or absolute under it)")
    cases: list[str] | None = Field(default=None, max_length=100_000, description="case ids (default: the selection)")
    selection: Literal["unlabeled", "all"] = "unlabeled"
    classes: list[int] | None = Field(default=None, max_length=255, description="class indices (default: every class)")
    probs: bool = Field(False, description="also write per-class probabilities (OUT/probs/<case>.nii.gz, 4D uint8 p·255)")
    volume_calls: bool = Field(True, description="each case as one volume request (3D context); false: requests of batch_slices slices")
    batch_slices: int = Field(8, ge=1, le=64)
    max_in_flight: int = Field(4, ge=1, le=64, description="this job's requests on the stream at once")
    cases_in_flight: int = Field(3, ge=1, le=32)


class ErrorDetail(BaseModel):
    detail: str


def _errors(*codes: int) -> dict:
    text = {
        400: "Bad input (a path outside the data root, a bad case id or class); `detail` says what",
        401: "Missing or invalid bearer token (when VESSA_API_TOKEN is set)",
        404: "No such job or dataset directory, or jobs are off on this service",
        409: "The job has not ended yet (its ranking is written when it does)",
        503: "The job runner could not be started",
    }
    return {c: {"model": ErrorDetail, "description": text[c]} for c in codes}


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


def _bad(detail: str, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


_OFF = "labeling jobs are off on this service: it needs a data_root (VESSA_DATA_ROOT) and the Redis path (redis_url, `vessa serve --stream`)"


_CLIENTS: dict[str, redis.Redis] = {}


def _redis() -> redis.Redis:
    # a service without jobs answers as if the routes were not there (404), not with a server error
    if not CONFIG.redis_url or not CONFIG.data_root:
        raise _bad(_OFF, 404)
    client = _CLIENTS.get(CONFIG.redis_url)
    if client is None:  # one pooled client per URL, not a connection per request
        client = _CLIENTS[CONFIG.redis_url] = redis.Redis.from_url(CONFIG.redis_url, socket_timeout=5)
    return client


def confine(path: str, root: str) -> Path:
    """`path` (relative to `root`, or absolute) resolved with symlinks followed; a 400 unless it lies
    inside `root`, a 404 unless it is a directory."""
    if "\x00" in path:
        raise _bad("the path holds a NUL byte")
    base = Path(root).resolve()
    candidate = Path(path)
    full = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if not full.is_relative_to(base):
        raise _bad(f"the dataset path must lie under the data root ({path!r} does not)")
    if not full.is_dir():
        raise _bad(f"no dataset directory {path!r} under the data root", 404)
    return full


def _spec(body: JobCreate, job_id: str) -> JobSpec:
    data = confine(body.data, CONFIG.data_root)
    if body.cases is not None:
        bad = [c for c in body.cases if not _CASE_RE.fullmatch(c)]
        if bad:
            raise _bad(f"case ids are 1-128 letters, digits, '.', '_' or '-': {bad[0]!r}")
    if body.classes is not None and any(not 1 <= c <= 255 for c in body.classes):
        raise _bad("class indices lie in 1..255 (0 is the background)")
    out_root = Path(CONFIG.job_output_root or Path(CONFIG.data_root) / "vessa-labels").resolve()
    return JobSpec(
        data=str(data),
        out=str(out_root / job_id),
        cases=body.cases,
        selection=body.selection,
        class_ids=body.classes,
        probs=body.probs,
        volume_calls=body.volume_calls,
        batch_slices=body.batch_slices,
        max_in_flight=body.max_in_flight,
        cases_in_flight=body.cases_in_flight,
    )


def _launch(job_id: str) -> None:
    module, _, name = CONFIG.job_runner.partition(":")
    getattr(importlib.import_module(module), name)(job_id, CONFIG.redis_url)


def _job_id(job_id: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{12}", job_id):
        raise _bad("no such job", 404)
    return job_id


@router.post("", status_code=202, response_model=JobCreated, summary="Start a labeling job", responses=_errors(400, 401, 404, 503))
async def create_job(body: JobCreate) -> JobCreated:
    r = _redis()
    job_id = new_job_id()
    spec = _spec(body, job_id)
    job = JobState(job_id=job_id, spec=spec)
    await asyncio.to_thread(save_job, r, job)
    try:
        await asyncio.to_thread(_launch, job_id)
    except Exception as exc:
        job.state, job.error = "failed", f"the job runner could not be started: {exc}"
        await asyncio.to_thread(save_job, r, job)
        raise _bad(job.error, 503) from None
    return JobCreated(job_id=job_id, state=job.state, data=spec.data, out=spec.out)


@router.get("", response_model=JobList, summary="Recent labeling jobs (newest first)", responses=_errors(400, 401, 404))
async def get_jobs(limit: int = 100) -> JobList:
    if not 1 <= limit <= 1000:
        raise _bad("limit must lie in 1..1000")
    jobs = await asyncio.to_thread(list_jobs, _redis(), limit)
    for j in jobs:
        j.ranking = None  # the list stays small; the ranking has its own route
    return JobList(jobs=jobs)


async def load_or_404(job_id: str) -> JobState:
    job = await asyncio.to_thread(load_job, _redis(), _job_id(job_id))
    if job is None:
        raise _bad("no such job", 404)
    return job


@router.get("/{job_id}", response_model=JobState, summary="A job's state, counts, errors and rate", responses=_errors(401, 404))
async def get_job(job_id: str) -> JobState:
    job = await load_or_404(job_id)
    job.ranking = None
    return job


@router.delete("/{job_id}", status_code=202, response_model=JobState, summary="Cancel a job (finished outputs stay)", responses=_errors(401, 404))
async def cancel_job(job_id: str) -> JobState:
    r = _redis()
    job = await load_or_404(job_id)
    if job.state not in FINAL:
        await asyncio.to_thread(request_cancel, r, job.job_id)
    job.ranking = None
    return job


@router.get("/{job_id}/ranking", response_model=Ranking, summary="Cases from least to most trusted", responses=_errors(401, 404, 409))
async def job_ranking(job_id: str) -> Ranking:
    job = await load_or_404(job_id)
    if job.ranking is None:
        raise _bad(f"the job is {job.state}: its ranking is written when it ends", 409)
    return Ranking(job_id=job.job_id, state=job.state, ranking=job.ranking)

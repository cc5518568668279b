"""Labeling-job state in Redis, shared by the REST ingress (which creates and cancels jobs) and the job
runner (which works them): any process can die and the job's state is still there.

Keys:
    vessa:job:<id>          JSON `JobState` (written by the ingress at creation, then by the runner)
    vessa:job:<id>:cancel   set by DELETE /v1/jobs/{id}; the runner polls it (a key of its own, so a
                            runner writing progress never overwrites a cancel)
    vessa:jobs              sorted set of job ids by creation time (GET /v1/jobs)

Job states: queued → running → done | failed | cancelled.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

JOB_INDEX = "vessa:jobs"
JOB_ID_RE = re.compile(r"[0-9a-f]{12}")
JOB_TTL_S = 30 * 86_400  # a finished job's state is kept a month
MAX_ERRORS = 1000  # per-case errors kept in the state (all of them are in the manifest)
FINAL = ("done", "failed", "cancelled")

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


CASE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class JobSpec(BaseModel):
    """What a labeling job labels, and how: the one description used by `POST /v1/jobs` (its body),
    `vessa label` (its flags) and the runner (`services.labeling.runner.LabelRunner`).

    Over REST `data` is relative to the service's data root (or absolute under it) and `out` is chosen
    by the service; once accepted, both are absolute paths."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(min_length=1, max_length=1024, description="dataset directory, relative to the data root (or absolute under it)")
    out: str | None = Field(None, description="output directory (set by the service for REST jobs)")
    cases: list[str] | None = Field(default=None, max_length=100_000, description="case ids (default: the selection)")
    selection: Literal["unlabeled", "all"] = "unlabeled"
    classes: list[int] | None = Field(default=None, max_length=255, description="class indices (default: every class)")
    probs: bool = Field(False, description="also write per-class probabilities (OUT/probs/<case>.nii.gz, 4D uint8 p·255)")
    volume_calls: bool = Field(True, description="each case as one volume request (3D context); false: requests of batch_slices slices")
    batch_slices: int = Field(8, ge=1, le=64)
    max_in_flight: int = Field(4, ge=1, le=64, description="this job's requests on the stream at once")
    cases_in_flight: int = Field(3, ge=1, le=32)
    timeout_s: float = Field(900.0, ge=1.0, le=86_400.0, description="seconds without any answer to this job before a waiting case fails")

    @field_validator("cases")
    @classmethod
    def _case_ids(cls, cases: list[str] | None) -> list[str] | None:
        bad = [c for c in cases or [] if not CASE_ID_RE.fullmatch(c)]
        if bad:
            raise ValueError(f"case ids are 1-128 letters, digits, '.', '_' or '-': {bad[0]!r}")
        return cases

    @field_validator("classes")
    @classmethod
    def _class_indices(cls, classes: list[int] | None) -> list[int] | None:
        if classes is not None and any(not 1 <= c <= 255 for c in classes):
            raise ValueError("class indices lie in 1..255 (0 is the background)")
        return classes


class JobCounts(BaseModel):
    cases: int = 0  # selected
    labeled: int = 0  # in this job's runs
    skipped: int = 0  # already labeled before (resume)
    failed: int = 0


class JobState(BaseModel):
    job_id: str
    state: JobStatus = "queued"
    spec: JobSpec
    created: float = Field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    counts: JobCounts = Field(default_factory=JobCounts)
    slices_total: int = 0
    slices_done: int = 0
    slices_per_s: float = 0.0
    errors: dict[str, str] = Field(default_factory=dict)  # case id → reason
    error: str | None = None  # why the job itself failed
    runs: int = 0  # how often a runner started on it (restarts included)
    model_version: str = ""
    bank_version: int = -1
    ranking: list[dict] | None = None  # least trusted first, written when the job ends


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def job_key(job_id: str) -> str:
    return f"vessa:job:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"vessa:job:{job_id}:cancel"


def save_job(r: redis.Redis, job: JobState) -> None:
    if len(job.errors) > MAX_ERRORS:
        job.errors = dict(list(job.errors.items())[:MAX_ERRORS])
    pipe = r.pipeline(transaction=True)
    pipe.set(job_key(job.job_id), job.model_dump_json(), ex=JOB_TTL_S)
    pipe.zadd(JOB_INDEX, {job.job_id: job.created})
    pipe.execute()


def load_job(r: redis.Redis, job_id: str) -> JobState | None:
    if not JOB_ID_RE.fullmatch(job_id):
        return None
    raw = r.get(job_key(job_id))
    return JobState.model_validate_json(raw) if raw else None


def list_jobs(r: redis.Redis, limit: int = 100) -> list[JobState]:
    """The most recent jobs first (ids whose state expired are dropped from the index)."""
    ids = [i.decode() if isinstance(i, bytes) else i for i in r.zrevrange(JOB_INDEX, 0, max(0, limit - 1))]
    out = []
    for job_id in ids:
        job = load_job(r, job_id)
        if job is None:
            r.zrem(JOB_INDEX, job_id)
        else:
            out.append(job)
    return out


def request_cancel(r: redis.Redis, job_id: str) -> None:
    r.set(cancel_key(job_id), "1", ex=JOB_TTL_S)


def cancel_requested(r: redis.Redis, job_id: str) -> bool:
    return bool(r.exists(cancel_key(job_id)))

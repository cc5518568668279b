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
from urllib.parse import urlsplit

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

JOB_INDEX = "vessa:jobs"
JOB_ID_RE = re.compile(r"[0-9a-f]{12}")
JOB_TTL_S = 30 * 86_400  # a finished job's state is kept a month
MAX_ERRORS = 1000  # per-case errors kept in the state (all of them are in the manifest)
FINAL = ("done", "failed", "cancelled")

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


CASE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


class DicomWebSource(BaseModel):
    """A study on a PACS as a job's input (services/labeling/dicomweb.py): its series are fetched with
    WADO-RS into OUT/dicomweb/<study>/ and labeled as a DICOM folder; `store_seg` sends the SEGs back
    with STOW-RS. Credentials never travel in the spec: the runner's environment holds them."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=8, max_length=2048, description="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    study: str = Field(min_length=1, max_length=64, description="StudyInstanceUID")
    series: str | None = Field(None, max_length=64, description="only this SeriesInstanceUID")
    store_seg: bool = Field(False, description="store the DICOM-SEG results back on the PACS (STOW-RS)")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the DICOMweb url must be http(s)://host/...")
        if parts.username or parts.password:
            raise ValueError("PACS credentials go in the service's environment, not in the url")
        return url.rstrip("/")

    @field_validator("study", "series")
    @classmethod
    def _uid(cls, uid: str | None) -> str | None:
        if uid is not None and not UID_RE.fullmatch(uid):
            raise ValueError(f"not a DICOM UID: {uid!r}")
        return uid


class LoopSpec(BaseModel):
    """The closed loop of a job with `rounds` > 0 (services/labeling/loop.py, docs/jobs.md "The loop").

    Each round r >= 1 trains a student (the Stage-2 trainer's `pseudo_labels` method: BCP's
    bidirectional copy-paste between the dataset's labeled slices and round r-1's pseudo-labeled
    slices, each pseudo-labeled slice weighted by the assistant's confidence) and relabels every case
    with the student's softmax as the assistant's prompt. `steps` is the CPU budget: student steps
    per round."""

    model_config = ConfigDict(extra="forbid")

    labeled: int = Field(3, ge=1, le=10_000, description="labeled patients: the first N of the dataset's protocol order (the only ground truth training reads)")
    # 1000: on ACDC (N = 3) 300 steps a round made round 1 worse than round 0 and 1000 lifted every
    # round (docs/results.md, "The closed loop"); about 4 minutes a round on 2 CPU cores
    steps: int = Field(1000, ge=1, le=1_000_000, description="student training steps per round (the budget)")
    batch_size: int = Field(8, ge=4, le=256, description="student batch: half labeled, half pseudo-labeled (even halves)")
    image_size: int = Field(128, ge=32, le=1024, description="student input side (multiple of 16)")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="pseudo-labeled slices less confident than this are left out")
    weighted: bool = Field(True, description="weight each pseudo-labeled slice by the assistant's confidence in it")
    warm_start: bool = Field(True, description="round r's student starts from round r-1's")
    lr: float = Field(0.01, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]+)?|auto)$", description="where the student trains and predicts")

    @model_validator(mode="after")
    def _check(self) -> LoopSpec:
        if self.image_size % 16:
            raise ValueError("loop.image_size must be a multiple of 16")
        if self.batch_size % 4:
            raise ValueError("loop.batch_size must be a multiple of 4 (two even halves)")
        return self

    def key(self) -> dict:
        """What a finished round depends on (all of it)."""
        return self.model_dump()


class JobSpec(BaseModel):
    """What a labeling job labels, and how: the one description used by `POST /v1/jobs` (its body),
    `vessa label` (its flags) and the runner (`services.labeling.runner.LabelRunner`).

    Over REST `data` is relative to the service's data root (or absolute under it) and `out` is chosen
    by the service; once accepted, both are absolute paths."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(
        "",
        max_length=1024,
        description="dataset directory, relative to the data root (or absolute under it); empty with `dicomweb`",
    )
    dicomweb: DicomWebSource | None = Field(None, description="label a study on a PACS instead of a directory")
    out: str | None = Field(None, description="output directory (set by the service for REST jobs)")
    cases: list[str] | None = Field(default=None, max_length=100_000, description="case ids (default: the selection)")
    selection: Literal["unlabeled", "all"] = "unlabeled"
    classes: list[int] | None = Field(default=None, max_length=255, description="class indices (default: every class)")
    class_names: dict[int, str] | None = Field(
        None, description="class names for the outputs (records, DICOM-SEG segments) where the dataset names none"
    )
    probs: bool = Field(False, description="also write per-class probabilities (OUT/probs/<case>.nii.gz, 4D uint8 p·255)")
    volume_calls: bool = Field(True, description="each case as one volume request (3D context); false: requests of batch_slices slices")
    batch_slices: int = Field(8, ge=1, le=64)
    max_in_flight: int = Field(4, ge=1, le=64, description="this job's requests on the stream at once")
    cases_in_flight: int = Field(3, ge=1, le=32)
    timeout_s: float = Field(900.0, ge=1.0, le=86_400.0, description="seconds without any answer to this job before a waiting case fails")
    temporal_context: float = Field(
        0.0,
        ge=0.0,
        le=1 / 3,
        description="4D cines: the weight w of each frame's neighbours in time; > 0 makes a second pass per frame prompted with "
        "(1 − 2w)·P_t + w·P_{t−1} + w·P_{t+1} of the first pass's probabilities (shared.data.cine.temporal_blend); 0: off",
    )
    rounds: int = Field(
        0,
        ge=0,
        le=20,
        description="rounds of the closed loop after the templates-only labels (round 0): each trains a student on the labeled cases "
        "plus the pseudo-labels and relabels every case with the student's softmax as the prompt (docs/jobs.md)",
    )
    loop: LoopSpec = Field(default_factory=LoopSpec, description="the loop's student settings (with rounds > 0)")

    @model_validator(mode="after")
    def _one_source(self) -> JobSpec:
        if not self.data and self.dicomweb is None:
            raise ValueError("a job needs data (a dataset directory) or dicomweb (a study on a PACS)")
        if self.rounds and self.dicomweb is not None:
            raise ValueError("the loop (rounds > 0) trains on a dataset's labeled cases: not on a DICOMweb study")
        return self

    @field_validator("cases")
    @classmethod
    def _case_ids(cls, cases: list[str] | None) -> list[str] | None:
        bad = [c for c in cases or [] if not CASE_ID_RE.fullmatch(c)]
        if bad:
            raise ValueError(f"case ids are 1-128 letters, digits, '.', '_' or '-': {bad[0]!r}")
        return cases

    @field_validator("class_names")
    @classmethod
    def _class_names(cls, names: dict[int, str] | None) -> dict[int, str] | None:
        if names is not None and any(not 0 <= k <= 255 or not 1 <= len(v) <= 64 for k, v in names.items()):
            raise ValueError("class names map indices 0..255 to names of 1-64 characters")
        return names

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
    round: int | None = None  # a loop job (spec.rounds > 0): the round being worked on
    rounds: list[dict] | None = None  # a loop job: the finished rounds' table (services/labeling/loop.py)


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

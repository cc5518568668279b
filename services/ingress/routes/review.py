"""Reviewing a job's pseudo-labels (docs/review.md): the routes behind the review page, usable without it.

  GET  /v1/jobs/{id}/cases                         cases, least trusted first, with review states
  GET  /v1/jobs/{id}/cases/{case}                  one case: record, per-slice confidence, review
  GET  /v1/jobs/{id}/cases/{case}/slices/{z}.png   a slice with the label as an overlay (?t=frame of a cine)
  GET  /v1/jobs/{id}/cases/{case}/thumbnail.png    the slice with the most foreground, small
  POST /v1/jobs/{id}/cases/{case}/review           approve, reject or flag, with a comment
  POST /v1/jobs/{id}/cases/{case}/label            upload a corrected label map (NIfTI) → version N
  POST /v1/jobs/{id}/bank                          approved and corrected cases → the template bank

The job's outputs are read from its OUT directory (job_output_root, storage the ingress shares with
the runner); the images from the case's input path, which must still lie under the data root. The
automatic label and the reviewed ones are kept apart (services/labeling/review.py).

A 4D cine case (its record has `frames`) is viewed frame by frame: `t` picks the frame of a slice, the
case list carries each frame's confidence and the least trusted frame, and a corrected label is a 4D
NIfTI of all frames.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from services.ingress.errors import bad, error_responses
from services.ingress.routes.jobs import load_or_404
from services.ingress.state import IngressState, get_state
from services.labeling import review as reviews
from services.labeling.cases import case_input, read_case, read_cine_case
from services.labeling.outputs import CaseRecord, read_records, record_path
from services.labeling.ranking import ranking
from services.labeling.render import class_colour, overlay, png, thumbnail_slice
from shared.data.cine import load_cine_labels
from shared.data.nifti import load_label_nifti

router = APIRouter(prefix="/v1/jobs", tags=["review"])
_CASE_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


_TEXT = {
    400: "Bad input (a label of the wrong shape or classes, a file that is no NIfTI); `detail` says what",
    401: "Missing or invalid bearer token (when VESSA_API_TOKEN is set)",
    404: "No such job, case or slice, or jobs are off on this service",
    409: "The case was not labeled, or its input or label file is gone",
    504: "The assistant did not answer in time",
}


_READ = error_responses(_TEXT, 400, 401, 404, 409)
_WRITE = error_responses(_TEXT, 400, 401, 404, 409)


# ------------------------------------------------------------------------------------------ schemas
class FrameRow(BaseModel):
    frame: int
    confidence: float | None


class CaseRow(BaseModel):
    rank: int
    case_id: str
    confidence: float | None
    worst_class: str | None
    classes: dict[str, dict]  # name → {index, confidence_mean, confidence_worst, volume_ml, colour}
    slices: int
    review: str
    versions: int
    in_bank: int | None
    frames: list[FrameRow] | None = None  # a cine: each frame's confidence
    worst_frame: int | None = None  # a cine: its least trusted frame


class CaseList(BaseModel):
    job_id: str
    state: str
    cases: list[CaseRow]


class CaseDetail(BaseModel):
    job_id: str
    case_id: str
    record: CaseRecord
    review: reviews.Review
    class_colours: dict[int, tuple[int, int, int]]


class ReviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: Literal["approved", "rejected", "flagged"]
    comment: str = Field("", max_length=reviews.MAX_COMMENT)


class BankBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cases: list[str] | None = Field(None, max_length=10_000, description="default: every approved or corrected case")


class BankResult(BaseModel):
    job_id: str
    added: dict[str, int]  # case → exemplars added
    skipped: dict[str, str]  # case → why
    bank_version: int


# ------------------------------------------------------------------------------------------ helpers
async def _job_out(job_id: str, state: IngressState) -> tuple[object, Path]:
    job = await load_or_404(job_id, state)
    return job, Path(job.spec.out)


def _record(out: Path, case_id: str) -> CaseRecord:
    if not _CASE_RE.fullmatch(case_id):
        raise bad("no such case", 404)
    path = record_path(out, case_id)
    if not path.is_file():
        raise bad(f"no labeled case {case_id!r} in this job", 404)
    rec = CaseRecord.model_validate_json(path.read_bytes())
    if rec.status != "ok" or rec.output is None:
        raise bad(f"case {case_id!r} was not labeled: {rec.error or rec.status}", 409)
    return rec


def _under_data_root(path: Path, state: IngressState) -> Path:
    root = Path(state.settings.data_root or "/nonexistent").resolve()
    real = path.resolve()
    if not real.is_relative_to(root):
        raise bad("the case's input is no longer under the data root", 409)
    return real


def _frames(rec: CaseRecord, state: IngressState) -> list:
    """The case's volumes (D, H, W) in [0, 1] as the runner read them: one per frame of a cine
    (normalised over the whole cine), else the one volume."""
    path = _under_data_root(Path(rec.input), state)
    if not path.exists():
        raise bad(f"the case's input {path.name} is gone", 409)
    try:
        case = case_input(rec.case_id, path)  # a folder: the DICOM series named by the case id
    except FileNotFoundError as exc:
        raise bad(str(exc), 409) from None
    if (case.kind == "cine" and not rec.frames) or (rec.frames and case.kind not in ("cine", "dicom")):
        raise bad(f"the case's input {path.name} changed since it was labeled (cine or not)", 409)
    key = ("img", str(path), rec.case_id, path.stat().st_mtime_ns)
    if rec.frames:  # a 4D NIfTI or a DICOM cine series
        return state.volumes.get(key, lambda: read_cine_case(case))
    return [state.volumes.get(key, lambda: read_case(case))]


def _image(rec: CaseRecord, state: IngressState, t: int = 0):
    """Frame t of the case (a 3D case has only frame 0). 404 for a frame it does not have."""
    frames = _frames(rec, state)
    if not 0 <= t < len(frames):
        raise bad(f"frame {t} is outside 0..{len(frames) - 1}", 404)
    return frames[t]


def _axes(vol) -> tuple[int, ...] | None:
    """The NIfTI axis order the case was read with (how its label files are laid out)."""
    return tuple(vol.meta["axes"]) if vol.meta and vol.meta.get("axes") is not None else None


def _label_frames(out: Path, rel: str, frames: list, state: IngressState) -> list[np.ndarray]:
    """The label file `rel` (relative to OUT) as one (D, H, W) map per frame of the case."""
    path = (out / rel).resolve()
    if not path.is_relative_to(out.resolve()) or not path.is_file():
        raise bad(f"label file {rel} is missing", 409)
    key = ("lab", str(path), path.stat().st_mtime_ns)
    if len(frames) > 1 or (frames[0].meta or {}).get("frame") is not None:
        return state.volumes.get(key, lambda: load_cine_labels(path, frames))
    return [state.volumes.get(key, lambda: load_label_nifti(path, _axes(frames[0])))]


def _label(out: Path, rel: str, vol, state: IngressState) -> np.ndarray:
    return _label_frames(out, rel, [vol], state)[0]


def _which_label(rec: CaseRecord, rev: reviews.Review, which: str) -> str | None:
    if which == "none":
        return None
    if which == "reviewed" or (which == "current" and rev.versions):
        if not rev.versions:
            raise bad("this case has no corrected label", 404)
        return rev.versions[-1].path
    return rec.output


def _class_table(out: Path) -> dict[int, str]:
    recs = read_records(out)
    names: dict[int, str] = {}
    for r in recs.values():
        for name, s in r.classes.items():
            names[s.index] = name
    return names


# ------------------------------------------------------------------------------------------ routes
@router.get("/{job_id}/cases", response_model=CaseList, summary="A job's cases, least trusted first, with review states", responses=_READ)
async def list_cases(job_id: str, state: IngressState = Depends(get_state)) -> CaseList:
    job, out = await _job_out(job_id, state)

    def build() -> list[CaseRow]:
        recs = read_records(out)
        rows = []
        for r in ranking(recs):
            rec = recs[r["case_id"]]
            rev = reviews.read_review(out, rec.case_id)
            rows.append(
                CaseRow(
                    rank=r["rank"],
                    case_id=rec.case_id,
                    confidence=rec.confidence,
                    worst_class=r["worst_class"],
                    classes={
                        n: {
                            "index": s.index,
                            "confidence_mean": s.confidence_mean,
                            "confidence_worst": s.confidence_worst,
                            "volume_ml": s.volume_ml,
                            "voxels": s.voxels,
                            "colour": class_colour(s.index),
                        }
                        for n, s in sorted(rec.classes.items(), key=lambda kv: kv[1].index)
                    },
                    slices=rec.slices,
                    review=rev.state,
                    versions=len(rev.versions),
                    in_bank=rev.bank_version,
                    frames=r.get("frames"),
                    worst_frame=r.get("worst_frame"),
                )
            )
        return rows

    return CaseList(job_id=job.job_id, state=job.state, cases=await asyncio.to_thread(build))


@router.get("/{job_id}/cases/{case_id}", response_model=CaseDetail, summary="One case: record, per-slice confidence, review", responses=_READ)
async def get_case(job_id: str, case_id: str, state: IngressState = Depends(get_state)) -> CaseDetail:
    job, out = await _job_out(job_id, state)
    rec = await asyncio.to_thread(_record, out, case_id)
    rev = await asyncio.to_thread(reviews.read_review, out, case_id)
    colours = {s.index: class_colour(s.index) for s in rec.classes.values()}
    return CaseDetail(job_id=job.job_id, case_id=case_id, record=rec, review=rev, class_colours=colours)


def _parse_classes(text: str | None) -> set[int] | None:
    if text is None or text == "all":
        return None
    if text == "":
        return set()
    try:
        return {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise bad("classes must be comma-separated class indices, 'all' or empty") from None


@router.get(
    "/{job_id}/cases/{case_id}/slices/{z}.png",
    summary="A slice with its label as a coloured overlay",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_READ},
)
async def slice_png(
    job_id: str,
    case_id: str,
    z: int,
    t: int = Query(0, ge=0, description="the frame of a 4D cine (0 for a 3D case)"),
    label: Literal["current", "auto", "reviewed", "none"] = Query("current", description="current: the newest correction, else the automatic label"),
    opacity: float = Query(0.45, ge=0.0, le=1.0),
    classes: str | None = Query(None, description="comma-separated class indices to show (default: all)"),
    centre: float = Query(0.5, ge=-1.0, le=2.0, description="window centre, as a fraction of the volume's range"),
    width: float = Query(1.0, gt=0.0, le=4.0, description="window width, as a fraction of the volume's range"),
    state: IngressState = Depends(get_state),
) -> Response:
    _, out = await _job_out(job_id, state)
    shown = _parse_classes(classes)

    def render() -> bytes:
        rec = _record(out, case_id)
        rev = reviews.read_review(out, case_id)
        frames = _frames(rec, state)
        vol = _image(rec, state, t)
        if not 0 <= z < vol.image.shape[0]:
            raise bad(f"slice {z} is outside 0..{vol.image.shape[0] - 1}", 404)
        rel = _which_label(rec, rev, label)
        lab = _label_frames(out, rel, frames, state)[t][z] if rel else None
        return png(overlay(vol.image[z], lab, opacity, shown, centre, width))

    return Response(await asyncio.to_thread(render), media_type="image/png", headers={"cache-control": "no-store"})


@router.get(
    "/{job_id}/cases/{case_id}/thumbnail.png",
    summary="The slice with the most foreground, small",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **_READ},
)
async def thumbnail(job_id: str, case_id: str, state: IngressState = Depends(get_state)) -> Response:
    _, out = await _job_out(job_id, state)

    def render() -> bytes:
        rec = _record(out, case_id)
        frames = _frames(rec, state)
        # a cine: its least trusted frame, as the viewer opens it
        t = min(rec.frames, key=lambda f: (f.confidence if f.confidence is not None else -1.0, f.frame)).frame if rec.frames else 0
        t = t if 0 <= t < len(frames) else 0
        vol = frames[t]
        lab = _label_frames(out, rec.output, frames, state)[t]
        z = thumbnail_slice(lab, vol.image.shape[0])
        return png(overlay(vol.image[z], lab[z]), max_side=96)

    return Response(await asyncio.to_thread(render), media_type="image/png", headers={"cache-control": "no-store"})


@router.post("/{job_id}/cases/{case_id}/review", response_model=reviews.Review, summary="Approve, reject or flag a case's label", responses=_WRITE)
async def review_case(job_id: str, case_id: str, body: ReviewBody, state: IngressState = Depends(get_state)) -> reviews.Review:
    _, out = await _job_out(job_id, state)
    await asyncio.to_thread(_record, out, case_id)
    return await asyncio.to_thread(reviews.set_state, out, case_id, body.state, body.comment)


@router.post("/{job_id}/cases/{case_id}/label", response_model=reviews.Review, summary="Upload a corrected label map (NIfTI, the input's geometry)", responses=_WRITE)
async def upload_label(
    job_id: str,
    case_id: str,
    file: UploadFile = File(..., description="label map, NIfTI (.nii or .nii.gz) in the case's geometry"),
    comment: str = Form("", max_length=reviews.MAX_COMMENT),
    state: IngressState = Depends(get_state),
) -> reviews.Review:
    _, out = await _job_out(job_id, state)
    data = await file.read()
    if not data:
        raise bad("the uploaded file is empty")

    def store() -> reviews.Review:
        rec = _record(out, case_id)
        frames = _frames(rec, state)
        vol = frames[0]
        try:
            # a cine: a 4D label map of all its frames
            labs = load_cine_labels(data, frames) if rec.frames else [load_label_nifti(data, _axes(vol))]
        except Exception as exc:  # not NIfTI, damaged, wrong type or frame count: a client error, named
            raise bad(f"cannot read the upload as a NIfTI label map: {str(exc)[:300]}") from None
        for lab in labs:
            if lab.shape != vol.image.shape:
                raise bad(f"the label map's shape {lab.shape} (slices first) differs from the case's {vol.image.shape}")
        known = set(_class_table(out)) | {0}
        found = {int(v) for lab in labs for v in np.unique(lab)}
        if not found <= known:
            raise bad(f"label values {sorted(found - known)} are not classes of this job ({sorted(known)})")
        return reviews.add_corrected(out, case_id, data)

    rev = await asyncio.to_thread(store)
    if comment:
        rev.comment = comment
        await asyncio.to_thread(reviews.write_review, out, rev)
    return rev


@router.post("/{job_id}/bank", response_model=BankResult, summary="Add the approved and corrected cases to the template bank", responses=error_responses(_TEXT, 400, 401, 404, 409, 504))
async def add_to_bank(job_id: str, body: BankBody | None = None, state: IngressState = Depends(get_state)) -> BankResult:
    _, out = await _job_out(job_id, state)
    recs = await asyncio.to_thread(read_records, out)
    wanted = body.cases if body and body.cases is not None else sorted(recs)
    templates = await state.call("templates")
    table = [{"index": c["index"], "name": c["name"]} for c in templates["classes"]]
    added: dict[str, int] = {}
    skipped: dict[str, str] = {}
    version = int(templates.get("version", -1))
    for case_id in wanted:
        rec = recs.get(case_id)
        if rec is None or rec.status != "ok":
            skipped[case_id] = "not a labeled case of this job"
            continue
        rev = await asyncio.to_thread(reviews.read_review, out, case_id)
        rel = rev.label_for_bank(rec.output)
        if rel is None:
            skipped[case_id] = f"review state {rev.state}: only approved or corrected cases go into the bank"
            continue
        if rev.bank_version is not None and rev.added_label == rel:
            skipped[case_id] = f"already in the bank (version {rev.bank_version})"
            continue
        if rec.frames:
            skipped[case_id] = "a 4D cine: its frames are not added to the bank (yet); add chosen frames as 3D cases"
            continue
        vol = await asyncio.to_thread(_image, rec, state)
        lab = await asyncio.to_thread(_label, out, rel, vol, state)
        # one template case per reviewed label version, so a new correction adds, never collides
        template_case = re.sub(r"[^A-Za-z0-9_-]", "-", f"{job_id}-{case_id}")[:40] + f"-v{len(rev.versions)}"
        res = await state.call("add_templates", vol.image.astype(np.float32), lab.astype(np.uint8), table, template_case, template_case)
        if "error" in res:
            skipped[case_id] = res["error"]
            continue
        version = int(res.get("version", version))
        added[case_id] = len(res.get("added", []))
        rev.bank_version, rev.added_label = version, rel
        rev.history.append({"at": rev.updated_at, "state": rev.state, "bank_version": version})
        await asyncio.to_thread(reviews.write_review, out, rev)
    return BankResult(job_id=job_id, added=added, skipped=skipped, bank_version=version)

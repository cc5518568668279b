"""What a labeling job writes, and how, so that a kill at any moment leaves nothing half-written.

    OUT/
      labels/<case>.nii.gz      uint8 label map in the input's geometry (affine and header kept)
      probs/<case>.nii.gz       with --probs: 4D uint8, per-class probability ·255 (background first)
      seg/<case>.dcm            for a DICOM series: the same label map as a DICOM-SEG referencing it
      records/<case>.json       one record per case: the resume truth (see CaseRecord)
      labels.json, labels.csv   the manifest: the job and every record, rebuilt from records/

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed over
the final name (`os.replace`, atomic on POSIX), so a reader sees the old file or the new one, never a
part. The record is renamed after the label map: a record marked ok always points at a whole file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, Field

MANIFEST_VERSION = 1
_SAFE_ID = re.compile(r"[^A-Za-z0-9_.-]")


class ClassStats(BaseModel):
    """Confidence of one class over the slices where it was found, and its volume."""

    index: int = 0  # the class's value in the label map
    confidence_mean: float | None = None
    confidence_worst: float | None = None  # the least confident slice holding the class
    worst_slice: int | None = None
    voxels: int = 0
    volume_ml: float | None = None  # where the voxel spacing is known


class FrameStats(BaseModel):
    """One frame of a 4D cine: its trust and per-class statistics (as a case's)."""

    frame: int
    confidence: float | None = None
    classes: dict[str, ClassStats] = Field(default_factory=dict)
    seg_output: str | None = None  # relative to OUT, a DICOM cine: this frame's DICOM-SEG


class CaseRecord(BaseModel):
    case_id: str
    status: str  # "ok" or "failed"
    error: str | None = None
    input: str
    input_sha256: str | None = None
    output: str | None = None  # relative to OUT
    probs_output: str | None = None  # relative to OUT, with --probs
    seg_output: str | None = None  # relative to OUT, for a DICOM input: the DICOM-SEG
    slices: int = 0
    shape: list[int] | None = None
    spacing: list[float] | None = None
    classes: dict[str, ClassStats] = Field(default_factory=dict)
    confidence: float | None = None  # the case's trust: mean over its classes' confidence_mean
    # per slice (through-plane order) and class (background first): the assistant's confidence, None
    # where a class was not asked for
    slice_confidence: list[list[float | None]] | None = None
    frames: list[FrameStats] | None = None  # a 4D cine: per frame (slice_confidence is frame-major)
    temporal_context: float | None = None  # a 4D cine: the job's temporal_context (0: no second pass)
    model_version: str = ""
    bank_version: int = -1
    seconds: float = 0.0
    run_id: str = ""
    finished_at: float = 0.0


def safe_name(case_id: str) -> str:
    """A case id as a file name (case ids come from file names, but never trust them with a path)."""
    name = _SAFE_ID.sub("_", case_id)
    return name if name not in ("", ".", "..") else f"case_{hashlib.sha1(case_id.encode()).hexdigest()[:12]}"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_partials(out: Path) -> int:
    """Delete temporary files a killed run left behind; returns how many."""
    n = 0
    for folder in (out, out / "labels", out / "probs", out / "seg", out / "records"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
    return n


def label_path(out: Path, case_id: str) -> Path:
    return out / "labels" / f"{safe_name(case_id)}.nii.gz"


def probs_path(out: Path, case_id: str) -> Path:
    return out / "probs" / f"{safe_name(case_id)}.nii.gz"


def seg_path(out: Path, case_id: str) -> Path:
    return out / "seg" / f"{safe_name(case_id)}.dcm"


def record_path(out: Path, case_id: str) -> Path:
    return out / "records" / f"{safe_name(case_id)}.json"


def write_record(out: Path, rec: CaseRecord) -> None:
    write_atomic(record_path(out, rec.case_id), rec.model_dump_json(indent=1).encode())


def read_records(out: Path) -> dict[str, CaseRecord]:
    """Every readable record under OUT/records (a damaged one is ignored: its case is labeled again)."""
    recs: dict[str, CaseRecord] = {}
    folder = out / "records"
    if not folder.is_dir():
        return recs
    for p in sorted(folder.glob("*.json")):
        try:
            rec = CaseRecord.model_validate_json(p.read_bytes())
        except Exception:
            continue
        recs[rec.case_id] = rec
    return recs


def seg_files(rec: CaseRecord) -> list[str]:
    """A record's DICOM-SEGs (relative to OUT): the case's one, or a DICOM cine's one per frame."""
    if rec.seg_output:
        return [rec.seg_output]
    return [f.seg_output for f in rec.frames or [] if f.seg_output]


def is_done(
    rec: CaseRecord | None,
    out: Path,
    sha: str,
    model_version: str,
    bank_version: int,
    probs: bool = False,
    seg: bool = False,
    temporal_context: float = 0.0,
) -> bool:
    """A case needs no new label: same input bytes, same model and bank, and its label file is there
    (and its probabilities file, when they are asked for; its DICOM-SEG, for a DICOM input; a cine
    labeled with the same temporal context)."""
    return (
        rec is not None
        and rec.status == "ok"
        and rec.input_sha256 == sha
        and rec.model_version == model_version
        and rec.bank_version == bank_version
        and rec.output is not None
        and (out / rec.output).is_file()
        and (not probs or (rec.probs_output is not None and (out / rec.probs_output).is_file()))
        and (not seg or (bool(seg_files(rec)) and all((out / p).is_file() for p in seg_files(rec))))
        and (rec.frames is None or (rec.temporal_context or 0.0) == temporal_context)
    )


CSV_COLUMNS = ["case_id", "status", "confidence", "slices", "seconds", "model_version", "bank_version", "input", "input_sha256", "output", "error", "probs_output", "seg_output"]


def write_manifest(out: Path, job: dict, records: dict[str, CaseRecord]) -> dict:
    """labels.json and labels.csv from the records (one row per case; per-class columns in the CSV)."""
    rows = [records[k] for k in sorted(records)]
    class_names = sorted({n for r in rows for n in r.classes})
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "job": job,
        "updated_at": time.time(),
        "counts": {
            "cases": len(rows),
            "ok": sum(r.status == "ok" for r in rows),
            "failed": sum(r.status != "ok" for r in rows),
        },
        "cases": [r.model_dump() for r in rows],
    }
    write_atomic(out / "labels.json", json.dumps(manifest, indent=1).encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    per_class = [f"{n}_{k}" for n in class_names for k in ("confidence_mean", "confidence_worst", "volume_ml")]
    w.writerow(CSV_COLUMNS + per_class)
    for r in rows:
        d = r.model_dump()
        line = ["" if d.get(c) is None else d[c] for c in CSV_COLUMNS]
        for n in class_names:
            s = r.classes.get(n)
            line += ["" if s is None or getattr(s, k) is None else getattr(s, k) for k in ("confidence_mean", "confidence_worst", "volume_ml")]
        w.writerow(line)
    write_atomic(out / "labels.csv", buf.getvalue().encode())
    return manifest


def read_manifest(out: Path) -> dict:
    path = Path(out) / "labels.json"
    if not path.is_file():
        raise FileNotFoundError(f"no labeling manifest at {path} (run `vessa label --out {out}` first)")
    return json.loads(path.read_text())

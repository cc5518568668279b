"""What a reviewer decided about a job's pseudo-labels, kept apart from what the assistant wrote.

    OUT/
      labels/<case>.nii.gz              the assistant's label map (a rerun may replace it)
      reviews/<case>.json               the review: state, comment, corrected versions, bank additions
      reviewed/<case>.v<N>.nii.gz       corrected label maps uploaded by a reviewer, version N = 1, 2, …

A rerun of the job writes only labels/, records/ and the manifest, never reviews/ or reviewed/, so a
reviewed label is never overwritten. Every file is written atomically (outputs.write_atomic).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from services.labeling.outputs import safe_name, write_atomic

ReviewStateName = Literal["unreviewed", "approved", "rejected", "flagged", "corrected"]
MAX_COMMENT = 2000


class LabelVersion(BaseModel):
    version: int
    path: str  # relative to OUT
    sha256: str
    uploaded_at: float


class Review(BaseModel):
    case_id: str
    state: ReviewStateName = "unreviewed"
    comment: str = ""
    versions: list[LabelVersion] = Field(default_factory=list)  # corrected labels, oldest first
    history: list[dict] = Field(default_factory=list)  # every change: {"at", "state", "comment"}
    bank_version: int | None = None  # the bank version this case's label was added to
    added_label: str | None = None  # which label went into the bank ("labels/…" or "reviewed/…")
    updated_at: float = 0.0

    def label_for_bank(self, auto_label: str | None) -> str | None:
        """The label a reviewer vouched for: the newest correction, or the automatic one if approved."""
        if self.state == "corrected" and self.versions:
            return self.versions[-1].path
        if self.state == "approved":
            return auto_label
        return None


def review_path(out: Path, case_id: str) -> Path:
    return Path(out) / "reviews" / f"{safe_name(case_id)}.json"


def read_review(out: Path, case_id: str) -> Review:
    path = review_path(out, case_id)
    if path.is_file():
        try:
            return Review.model_validate_json(path.read_bytes())
        except ValueError:
            pass  # a damaged review reads as unreviewed; the next decision rewrites it
    return Review(case_id=case_id)


def write_review(out: Path, review: Review) -> Review:
    review.updated_at = time.time()
    write_atomic(review_path(out, review.case_id), review.model_dump_json(indent=1).encode())
    return review


def set_state(out: Path, case_id: str, state: ReviewStateName, comment: str = "") -> Review:
    """Approve, reject or flag (with a comment); "corrected" comes only with an uploaded label."""
    if state in ("corrected", "unreviewed"):
        raise ValueError(f"state {state!r} cannot be set directly (upload a corrected label instead)")
    if len(comment) > MAX_COMMENT:
        raise ValueError(f"the comment is longer than {MAX_COMMENT} characters")
    rev = read_review(out, case_id)
    rev.state, rev.comment = state, comment
    rev.history.append({"at": time.time(), "state": state, "comment": comment})
    return write_review(out, rev)


def add_corrected(out: Path, case_id: str, nifti: bytes, comment: str = "") -> Review:
    """Store a corrected label map (already validated against the case) as the next version."""
    rev = read_review(out, case_id)
    version = (rev.versions[-1].version if rev.versions else 0) + 1
    rel = f"reviewed/{safe_name(case_id)}.v{version}.nii.gz"
    write_atomic(Path(out) / rel, nifti)
    rev.versions.append(
        LabelVersion(version=version, path=rel, sha256=hashlib.sha256(nifti).hexdigest(), uploaded_at=time.time())
    )
    rev.state, rev.comment = "corrected", comment or rev.comment
    rev.history.append({"at": time.time(), "state": "corrected", "comment": comment, "version": version})
    return write_review(out, rev)

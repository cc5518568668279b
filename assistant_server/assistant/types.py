"""What goes into and out of the assistant: slices, answers and the errors a caller can fix."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


class AssistantInputError(ValueError):
    """A request the assistant cannot answer as asked: the message says what was wrong."""


class BankVersionError(AssistantInputError):
    """The request pins a bank version that is not the one being served."""


@dataclass
class SliceInput:
    """One slice to pseudo-label. image: (H, W) numeric or None when sent by `slice_hash` alone;
    student_probs: (C, H', W') float in [0, 1] (any size, resized to the slice) or None."""

    image: np.ndarray | None = None
    slice_hash: str | None = None
    student_probs: np.ndarray | None = None


@dataclass
class SliceOutput:
    """status "ok" or "miss" (hash unknown: resend the image). label: (H, W) uint8; confidence: (C,)
    float32 per class, background first, NaN for classes not asked for; probs: (C, H, W) float16."""

    status: str
    slice_hash: str
    label: np.ndarray | None = None
    confidence: np.ndarray | None = None
    probs: np.ndarray | None = None


def copy_output(out: SliceOutput) -> SliceOutput:
    """A remembered answer's own arrays: what a caller does with its copy never reaches the cache."""
    return dataclasses.replace(out, label=out.label.copy(), confidence=out.confidence.copy())

"""Pseudo-labeled slices: what a student of the closed loop trains on besides the labeled cases.

A labeling job (services/labeling/) writes one label map per case; the loop turns the previous round's
maps into `PseudoLabeledSlices` (the cases' canonical slices, the job's labels for them and the
assistant's confidence per slice) and hands them to the Stage-2 trainer in place of the protocol's
unlabeled pool (`student_trainer.data.load_training_data(..., pseudo=...)`). The labels here are the
job's, never a dataset's ground truth: the builder reads a case's image and the job's label file, and
the trainer then reads ground truth only through the labeled pool of `shared.data.split`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PseudoLabeledSlices:
    """images (N, S, S) float32 in [0, 1]; labels (N, S, S) uint8 (the job's pseudo-labels); weights (N,)
    float32 in [0, 1] (the assistant's confidence per slice, or 1); keys `<case>_slice_<k>`; cases (N,)
    the case of each slice; `dropped`: slices left out by the confidence filter, per case."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    keys: list[str]
    cases: list[str]
    dropped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.images.ndim != 3 or self.labels.shape != self.images.shape:
            raise ValueError(f"pseudo-labeled images {self.images.shape} and labels {self.labels.shape} must be (N, S, S) alike")
        if self.images.shape[0] != n or self.weights.shape != (n,) or len(self.cases) != n:
            raise ValueError("pseudo-labeled slices: images, labels, weights, keys and cases must have one entry per slice")
        if n and (not np.isfinite(self.weights).all() or self.weights.min() < 0 or self.weights.max() > 1):
            raise ValueError("pseudo-label weights must lie in [0, 1]")

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def empty(size: int) -> PseudoLabeledSlices:
        return PseudoLabeledSlices(
            np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.uint8), np.zeros((0,), np.float32), [], []
        )

"""The data layer's types.

Labeled and unlabeled slices are different types on purpose: `UnlabeledSlice` has no label field, and
the readers' `read_unlabeled` never opens the label data, so training code cannot read the label of an
unlabeled case (see `shared.data.split`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ClassInfo:
    """One segmentation class: index in the label map, short name, anatomical description."""

    index: int
    name: str
    description: str = ""


@dataclass(frozen=True)
class SliceRef:
    """Where a 2D training slice lives. `key` is unique in its dataset (e.g. `patient003_frame01_slice_1`)."""

    key: str
    case_id: str  # a volume / frame, e.g. patient003_frame01
    patient_id: str  # the unit of the labeled/unlabeled split, e.g. patient003
    slice_index: int


@dataclass(frozen=True)
class LabeledSlice:
    """A labeled 2D slice. image: (H, W) float32 in [0, 1]; label: (H, W) uint8 class indices."""

    ref: SliceRef
    image: np.ndarray
    label: np.ndarray


@dataclass(frozen=True)
class UnlabeledSlice:
    """An unlabeled 2D slice: the image alone. image: (H, W) float32 in [0, 1]. No label, by design."""

    ref: SliceRef
    image: np.ndarray


@dataclass
class Volume:
    """A 3D volume, slices along axis 0.

    image: (D, H, W) float32; label: (D, H, W) uint8 or None; spacing: (z, y, x) in mm or None;
    affine: (4, 4) float64 voxel-to-world of the source file (NIfTI axis order) or None; header: the
    source NIfTI header when there was one, so label maps written back keep it.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    affine: np.ndarray | None = None
    header: object | None = None
    meta: dict = field(default_factory=dict)

"""The `SliceDataset` interface shared by every on-disk layout, and `open_dataset` to pick one.

A dataset is a list of 2D training slices (in the protocol's order) plus whole 3D volumes for
evaluation ('val', 'test'). Slices are read either labeled (`read_labeled`) or unlabeled
(`read_unlabeled`); the unlabeled path never opens or reads the label data, which is what lets
`shared.data.split` hand training code an unlabeled pool that cannot leak labels.

Layouts (detected by `open_dataset`):

- SSL4MIS HDF5 (`train_slices.list` + `slices/`): `shared.data.h5_layout.SSL4MISDataset`
- nnU-Net / MSD NIfTI (`dataset.json`): `shared.data.msd_layout.MSDDataset`
- the prepared cache (`vessa_cache.json`): `shared.data.cache_layout.CacheDataset`
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path

from shared.data.types import ClassInfo, LabeledSlice, SliceRef, UnlabeledSlice, Volume

VOLUME_SPLITS = ("val", "test")

_FRAME_RE = re.compile(r"^(?P<patient>.+?)_frame\d+$")
_SLICE_RE = re.compile(r"^(?P<case>.+)_slice_(?P<index>\d+)$")


def patient_of_case(case_id: str) -> str:
    """ACDC-style patient id of a case: `patient003_frame01` -> `patient003`; other names map to themselves."""
    m = _FRAME_RE.match(case_id)
    return m.group("patient") if m else case_id


def parse_slice_key(key: str) -> tuple[str, int]:
    """Split an SSL4MIS slice key `<case>_slice_<k>` into (case, k). Raises ValueError otherwise."""
    m = _SLICE_RE.match(key)
    if not m:
        raise ValueError(f"not an SSL4MIS slice key (<case>_slice_<k>): {key!r}")
    return m.group("case"), int(m.group("index"))


def slice_key(case_id: str, index: int) -> str:
    return f"{case_id}_slice_{index}"


class SliceDataset(ABC):
    """A segmentation dataset seen as 2D training slices plus 3D evaluation volumes.

    Attributes: `root` (the dataset directory), `name`, `format` (layout name) and `classes` (the class
    table, index 0 background). Images are float32 in [0, 1]; labels uint8 class indices.
    """

    root: Path
    name: str
    format: str
    classes: list[ClassInfo]

    @abstractmethod
    def slice_refs(self) -> list[SliceRef]:
        """The training slices in protocol order (the order the labeled/unlabeled split follows)."""

    def patients(self) -> list[str]:
        """Patient ids in order of first appearance in `slice_refs()`."""
        seen: dict[str, None] = {}
        for ref in self.slice_refs():
            seen.setdefault(ref.patient_id, None)
        return list(seen)

    def cases(self) -> list[str]:
        """Training case ids (volumes / frames) in order of first appearance in `slice_refs()`."""
        seen: dict[str, None] = {}
        for ref in self.slice_refs():
            seen.setdefault(ref.case_id, None)
        return list(seen)

    @abstractmethod
    def read_labeled(self, ref: SliceRef) -> LabeledSlice:
        """Image (H, W) float32 in [0, 1] and label (H, W) uint8 of one training slice."""

    @abstractmethod
    def read_unlabeled(self, ref: SliceRef) -> UnlabeledSlice:
        """Image (H, W) float32 in [0, 1] of one training slice. Never opens or reads label data."""

    def slice_shape(self, ref: SliceRef) -> tuple[int, int]:
        """(H, W) of a training slice as `read_unlabeled` returns it. Layouts override this with a
        metadata-only lookup."""
        return tuple(self.read_unlabeled(ref).image.shape)  # type: ignore[return-value]

    def volume_splits(self) -> list[str]:
        """The evaluation splits this dataset has ('val', 'test'), without raising for absent ones."""
        out = []
        for split in VOLUME_SPLITS:
            try:
                self.volume_ids(split)
            except (FileNotFoundError, ValueError):
                continue
            out.append(split)
        return out

    @abstractmethod
    def volume_ids(self, split: str) -> list[str]:
        """Case ids of the evaluation volumes of `split` ('val' or 'test').

        Raises FileNotFoundError naming the missing file when the split does not exist, ValueError for
        an unknown split name."""

    @abstractmethod
    def read_volume(self, case_id: str, split: str, with_label: bool = True) -> Volume:
        """A whole volume: image (D, H, W) float32 in [0, 1], label (D, H, W) uint8 or None.

        With `with_label=False` the label data is not opened."""

    def case_spacing(self, case_id: str) -> tuple[float, float, float] | None:
        """Voxel spacing (z, y, x) in mm of a training case, where the layout knows it."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, name={self.name!r})"


def check_split(split: str) -> None:
    if split not in VOLUME_SPLITS:
        raise ValueError(f"unknown volume split {split!r}; expected one of {', '.join(VOLUME_SPLITS)}")

"""The semi-supervised protocol split: the first N patients are labeled, every other slice is unlabeled.

`split_by_patient(ds, n)` follows the order of `ds.patients()` (first appearance in the protocol's
slice list; for ACDC N=3 gives patients 038, 050, 099). The two pools are deliberately asymmetric:

- `LabeledPool` reads through `ds.read_labeled` and yields `LabeledSlice` (image + label);
- `UnlabeledPool` is built from the bound method `ds.read_unlabeled` alone and the slice references,
  never from the dataset, and yields `UnlabeledSlice` (no label field). The readers' `read_unlabeled`
  never opens label data, so nothing reachable from the unlabeled pool reads an unlabeled label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.data.base import SliceDataset
from shared.data.types import LabeledSlice, SliceRef, UnlabeledSlice


class LabeledPool:
    """The labeled slices: `len`, `pool[i] -> LabeledSlice`, `patients`, `refs`."""

    def __init__(
        self, read: Callable[[SliceRef], LabeledSlice], refs: Sequence[SliceRef], patients: Sequence[str]
    ):
        self._read = read
        self.refs: tuple[SliceRef, ...] = tuple(refs)
        self.patients: tuple[str, ...] = tuple(patients)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> LabeledSlice:
        return self._read(self.refs[index])

    def __iter__(self):
        for ref in self.refs:
            yield self._read(ref)


class UnlabeledPool:
    """The unlabeled slices: `len`, `pool[i] -> UnlabeledSlice` (image only), `patients`, `refs`.

    Holds only a callable that reads images (`ds.read_unlabeled`) and the references, so code handed
    this pool has no label-reading path."""

    def __init__(
        self,
        read_image: Callable[[SliceRef], UnlabeledSlice],
        refs: Sequence[SliceRef],
        patients: Sequence[str],
    ):
        self._read_image = read_image
        self.refs: tuple[SliceRef, ...] = tuple(refs)
        self.patients: tuple[str, ...] = tuple(patients)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> UnlabeledSlice:
        return self._read_image(self.refs[index])

    def __iter__(self):
        for ref in self.refs:
            yield self._read_image(ref)


@dataclass(frozen=True)
class ProtocolSplit:
    """`labeled` (first `n_labeled` patients) and `unlabeled` (the rest) training pools."""

    n_labeled: int
    labeled: LabeledPool
    unlabeled: UnlabeledPool

    @property
    def labeled_patients(self) -> tuple[str, ...]:
        return self.labeled.patients

    @property
    def unlabeled_patients(self) -> tuple[str, ...]:
        return self.unlabeled.patients


def split_by_patient(ds: SliceDataset, n_labeled: int) -> ProtocolSplit:
    """Label the first `n_labeled` patients of `ds.patients()`; all other slices are unlabeled.

    Raises ValueError unless 1 <= n_labeled < number of patients (both pools must be non-empty).
    """
    patients = ds.patients()
    if isinstance(n_labeled, bool) or not isinstance(n_labeled, int):
        raise ValueError(f"n_labeled must be an integer, got {n_labeled!r}")
    if n_labeled < 1 or n_labeled >= len(patients):
        raise ValueError(
            f"n_labeled must be between 1 and {len(patients) - 1} (the dataset has {len(patients)} patients), "
            f"got {n_labeled}"
        )
    chosen = set(patients[:n_labeled])
    refs = ds.slice_refs()
    labeled = [r for r in refs if r.patient_id in chosen]
    unlabeled = [r for r in refs if r.patient_id not in chosen]
    return ProtocolSplit(
        n_labeled=n_labeled,
        labeled=LabeledPool(ds.read_labeled, labeled, patients[:n_labeled]),
        unlabeled=UnlabeledPool(ds.read_unlabeled, unlabeled, patients[n_labeled:]),
    )

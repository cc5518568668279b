"""The SSL4MIS HDF5 layout (the ACDC preprocessing of HiLab-git/SSL4MIS).

    root/
      train_slices.list      training slice keys `<case>_slice_<k>`, in protocol order
      train.list             training cases (informational)
      val.list, test.list    evaluation cases
      slices/<key>.h5        `image` float32 (H, W) in [0, 1], `label` uint8 (H, W)
      volumes/<case>.h5      `image` float32 (D, H, W), `label` uint8 (D, H, W)

The patient of a case is its ACDC prefix (`patient003_frame01` -> `patient003`). The layout stores no
voxel spacing. `read_unlabeled` and `read_volume(with_label=False)` open the file and read only the
`image` dataset; the `label` dataset is never touched (a file without one reads fine).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from shared.data.base import SliceDataset, check_split, parse_slice_key, patient_of_case
from shared.data.classes import CARDIAC_CLASSES
from shared.data.types import ClassInfo, LabeledSlice, SliceRef, UnlabeledSlice, Volume


def read_list(path: Path) -> list[str]:
    """Non-empty lines of an SSL4MIS `.list` file, any `.h5` suffix removed."""
    out = []
    for line in path.read_text().splitlines():
        item = line.strip()
        if item:
            out.append(item[:-3] if item.endswith(".h5") else item)
    return out


def _image(f: h5py.File, path: Path) -> np.ndarray:
    if "image" not in f:
        raise KeyError(f"{path} has no 'image' dataset")
    return np.asarray(f["image"][()], dtype=np.float32)


def _label(f: h5py.File, path: Path) -> np.ndarray:
    if "label" not in f:
        raise KeyError(f"{path} has no 'label' dataset")
    return np.asarray(f["label"][()]).astype(np.uint8)


class SSL4MISDataset(SliceDataset):
    """Reader of the SSL4MIS HDF5 layout (see the module docstring)."""

    format = "ssl4mis-h5"

    def __init__(self, root: str | Path, classes: list[ClassInfo] | None = None):
        self.root = Path(root)
        self.name = self.root.resolve().name
        self.classes = list(classes) if classes is not None else list(CARDIAC_CLASSES)
        list_path = self.root / "train_slices.list"
        if not list_path.is_file():
            raise FileNotFoundError(f"SSL4MIS layout needs {list_path}")
        refs = []
        for key in read_list(list_path):
            case, index = parse_slice_key(key)
            refs.append(SliceRef(key=key, case_id=case, patient_id=patient_of_case(case), slice_index=index))
        if not refs:
            raise ValueError(f"{list_path} lists no slices")
        self._refs = refs

    def slice_refs(self) -> list[SliceRef]:
        return list(self._refs)

    def _slice_path(self, ref: SliceRef) -> Path:
        return self.root / "slices" / f"{ref.key}.h5"

    def read_labeled(self, ref: SliceRef) -> LabeledSlice:
        path = self._slice_path(ref)
        with h5py.File(path, "r") as f:
            return LabeledSlice(ref=ref, image=_image(f, path), label=_label(f, path))

    def read_unlabeled(self, ref: SliceRef) -> UnlabeledSlice:
        path = self._slice_path(ref)
        with h5py.File(path, "r") as f:
            return UnlabeledSlice(ref=ref, image=_image(f, path))  # only 'image' is read

    def slice_shape(self, ref: SliceRef) -> tuple[int, int]:
        with h5py.File(self._slice_path(ref), "r") as f:
            return tuple(int(s) for s in f["image"].shape)  # type: ignore[return-value]

    def volume_ids(self, split: str) -> list[str]:
        check_split(split)
        path = self.root / f"{split}.list"
        if not path.is_file():
            raise FileNotFoundError(f"the '{split}' split needs {path}, which does not exist")
        return read_list(path)

    def read_volume(self, case_id: str, split: str, with_label: bool = True) -> Volume:
        check_split(split)
        path = self.root / "volumes" / f"{case_id}.h5"
        if not path.is_file():
            raise FileNotFoundError(f"volume {case_id!r} of split {split!r} not found: {path}")
        with h5py.File(path, "r") as f:
            image = _image(f, path)
            label = _label(f, path) if with_label else None
        return Volume(case_id=case_id, image=image, label=label, spacing=None, meta={"source": str(path)})

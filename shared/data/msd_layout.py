"""The nnU-Net / Medical Segmentation Decathlon NIfTI layout.

    root/
      dataset.json              labels ({"background": 0, ...} nnU-Net v2, or {"0": "background"} MSD),
                                channel_names (v2) or modality (MSD): one channel only, optional
                                label_descriptions ({name or index: one-line description})
      classes.json              optional, when dataset.json has no label_descriptions: the same mapping,
                                or a list of {"index"/"name", "description"}
      imagesTr/<case>_0000.nii.gz   (MSD: imagesTr/<case>.nii.gz)
      labelsTr/<case>.nii.gz
      imagesTs/, labelsTs/      optional test images / labels
      splits.json               optional {"train": [...], "val": [...], "test": [...]}

Training slices are the 2D slices along each training volume's through-plane axis (largest spacing),
in case order (the order of splits.json "train", else sorted case ids), slice index ascending. Without
splits.json every imagesTr case is a training case and there is no 'val' split; 'test' then means the
imagesTs cases. The patient of a case is the case itself unless dataset.json maps it in "patients"
({case: patient}). A class's text for the assistant is its name plus its description from
label_descriptions or classes.json, or its name alone (shared/data/classes.py).

Image volumes are min-max normalised per volume and cached in memory once read. Label volumes are
opened only by `read_labeled` and `read_volume(with_label=True)`; `read_unlabeled` never opens a
labelsTr file.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from shared.data.base import SliceDataset, check_split, slice_key
from shared.data.classes import classes_from_names, parse_descriptions
from shared.data.nifti import load_label_nifti, load_nifti, nifti_geometry, normalize_minmax
from shared.data.types import ClassInfo, LabeledSlice, SliceRef, UnlabeledSlice, Volume

_ENDINGS = (".nii.gz", ".nii")


def parse_labels(labels: dict) -> dict[int, str]:
    """{index: name} from either label convention; region labels (lists) are rejected."""
    out: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[int(value)] = str(key)  # nnU-Net v2: name -> index
        elif isinstance(value, str) and str(key).lstrip("-").isdigit():
            out[int(key)] = value  # MSD: "index" -> name
        else:
            raise ValueError(
                f"unsupported label entry {key!r}: {value!r} (region-based labels are not supported)"
            )
    return out


CLASSES_FILE = "classes.json"


def read_classes(root: Path, meta: dict) -> list[ClassInfo]:
    """The class table: names from dataset.json's "labels"; descriptions from its optional
    "label_descriptions" ({name or index: text}) or, failing that, from `classes.json` beside it (the same
    mapping, or a list of {"index"/"name", "description"}); a class with neither is its name alone."""
    names = parse_labels(meta["labels"])
    if "label_descriptions" in meta:
        table, where = meta["label_descriptions"], f"{root / 'dataset.json'} label_descriptions"
    elif (root / CLASSES_FILE).is_file():
        table, where = json.loads((root / CLASSES_FILE).read_text()), str(root / CLASSES_FILE)
    else:
        return classes_from_names(names)
    return classes_from_names(names, parse_descriptions(table, names, where))


def _case_files(folder: Path) -> dict[str, Path]:
    """{case id: image path} for one-channel images in `folder` (`<case>_0000.nii.gz` or `<case>.nii.gz`)."""
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith("."):  # MSD archives carry macOS '._' resource files
            continue
        ending = next((e for e in _ENDINGS if name.endswith(e)), None)
        if ending is None:
            continue
        stem = name[: -len(ending)]
        if stem.endswith("_0000"):
            out[stem[:-5]] = path
        elif len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
            continue  # another channel of a multi-channel case
        else:
            out.setdefault(stem, path)
    return out


class MSDDataset(SliceDataset):
    """Reader of the nnU-Net / MSD NIfTI layout (see the module docstring)."""

    format = "msd-nifti"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"nnU-Net/MSD layout needs {meta_path}")
        self.meta = json.loads(meta_path.read_text())
        self.name = str(self.meta.get("name") or self.root.resolve().name)
        if "labels" not in self.meta:
            raise ValueError(f"{meta_path} has no 'labels' table")
        self.classes = read_classes(self.root, self.meta)
        channels = self.meta.get("channel_names") or self.meta.get("modality") or {"0": "image"}
        if len(channels) != 1:
            raise ValueError(
                f"{meta_path}: only single-channel images are supported, got channels {channels}"
            )
        self._patients: dict[str, str] = {
            str(k): str(v) for k, v in (self.meta.get("patients") or {}).items()
        }
        self._train_files = _case_files(self.root / "imagesTr")
        self._test_files = _case_files(self.root / "imagesTs")
        if not self._train_files:
            raise ValueError(f"no training images found in {self.root / 'imagesTr'}")
        splits_path = self.root / "splits.json"
        self.splits: dict[str, list[str]] | None = None
        if splits_path.is_file():
            self.splits = {k: [str(c) for c in v] for k, v in json.loads(splits_path.read_text()).items()}
            for split, cases in self.splits.items():
                pool = self._test_files if split == "test" else self._train_files
                missing = [c for c in cases if c not in pool and c not in self._train_files]
                if missing:
                    raise ValueError(f"{splits_path}: {split} cases without images: {missing[:5]}")
        train_cases = (
            self.splits["train"] if self.splits and "train" in self.splits else sorted(self._train_files)
        )
        self._train_cases = list(train_cases)
        self._images: dict[str, Volume] = {}  # normalised image volumes, loaded on first use
        self._labels: dict[str, np.ndarray] = {}  # label volumes, loaded only by labeled reads
        self._lock = threading.Lock()
        self._refs: list[SliceRef] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # locks do not pickle; data-loader workers get their own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- cases -------------------------------------------------------------------------------------
    def patient_of(self, case_id: str) -> str:
        return self._patients.get(case_id, case_id)

    def _image_path(self, case_id: str) -> Path:
        path = self._train_files.get(case_id) or self._test_files.get(case_id)
        if path is None:
            raise KeyError(f"no image for case {case_id!r} in {self.root}")
        return path

    def _label_path(self, case_id: str) -> Path:
        folder = "labelsTr" if case_id in self._train_files else "labelsTs"
        for ending in _ENDINGS:
            path = self.root / folder / f"{case_id}{ending}"
            if path.is_file():
                return path
        raise FileNotFoundError(f"no label file for case {case_id!r} in {self.root / folder}")

    def _volume(self, case_id: str) -> Volume:
        vol = self._images.get(case_id)
        if vol is None:
            vol = load_nifti(self._image_path(case_id), case_id=case_id)
            vol.image = normalize_minmax(vol.image)
            with self._lock:
                self._images[case_id] = vol
        return vol

    def _label_volume(self, case_id: str) -> np.ndarray:
        lab = self._labels.get(case_id)
        if lab is None:
            vol = self._volume(case_id)
            lab = load_label_nifti(self._label_path(case_id), axes=vol.meta["axes"])
            if lab.shape != vol.image.shape:
                raise ValueError(f"label of {case_id!r} has shape {lab.shape}, image {vol.image.shape}")
            with self._lock:
                self._labels[case_id] = lab
        return lab

    # -- slices ------------------------------------------------------------------------------------
    def slice_refs(self) -> list[SliceRef]:
        if self._refs is None:
            refs = []
            for case in self._train_cases:
                depth = self._depth(case)
                patient = self.patient_of(case)
                refs.extend(SliceRef(slice_key(case, k), case, patient, k) for k in range(depth))
            self._refs = refs
        return list(self._refs)

    def _depth(self, case_id: str) -> int:
        vol = self._images.get(case_id)
        if vol is not None:
            return int(vol.image.shape[0])
        return nifti_geometry(self._image_path(case_id))[0][0]  # header only

    def read_labeled(self, ref: SliceRef) -> LabeledSlice:
        image = self._volume(ref.case_id).image[ref.slice_index]
        label = self._label_volume(ref.case_id)[ref.slice_index]
        return LabeledSlice(ref=ref, image=image.copy(), label=label.copy())

    def read_unlabeled(self, ref: SliceRef) -> UnlabeledSlice:
        return UnlabeledSlice(ref=ref, image=self._volume(ref.case_id).image[ref.slice_index].copy())

    def slice_shape(self, ref: SliceRef) -> tuple[int, int]:
        return tuple(self._volume(ref.case_id).image.shape[1:])  # type: ignore[return-value]

    def case_spacing(self, case_id: str) -> tuple[float, float, float] | None:
        vol = self._images.get(case_id)
        return vol.spacing if vol is not None else nifti_geometry(self._image_path(case_id))[1]

    # -- volumes -----------------------------------------------------------------------------------
    def volume_ids(self, split: str) -> list[str]:
        check_split(split)
        if self.splits is not None and split in self.splits:
            return list(self.splits[split])
        if split == "test" and self._test_files:
            return sorted(self._test_files)
        what = "splits.json" if split == "val" else "splits.json ('test') or imagesTs/"
        raise FileNotFoundError(f"the '{split}' split needs {self.root / what}, which does not exist")

    def read_volume(self, case_id: str, split: str, with_label: bool = True) -> Volume:
        check_split(split)
        vol = self._volume(case_id)
        label = self._label_volume(case_id) if with_label else None
        return Volume(
            case_id=case_id,
            image=vol.image.copy(),
            label=None if label is None else label.copy(),
            spacing=vol.spacing,
            affine=vol.affine,
            header=vol.header,
            meta=dict(vol.meta),
        )

"""The cases of a dataset to label, in any layout VESSA reads, and how one is read.

Layouts: nnU-Net/MSD (`dataset.json`: imagesTr/ and imagesTs/), SSL4MIS HDF5 (`volumes/*.h5`), or a
plain folder of `.nii`/`.nii.gz` files. A case is *labeled* when its layout holds a ground-truth label
for it (labelsTr/labelsTs file, an HDF5 `label` dataset); `--unlabeled` selects the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from shared.data.classes import CARDIAC_CLASSES
from shared.data.msd_layout import _case_files, parse_labels
from shared.data.nifti import load_nifti, nifti_geometry, normalize_minmax
from shared.data.types import Volume

_NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseInput:
    """One volume to label. kind: "nifti" or "h5"; labeled: a ground truth exists in the layout."""

    case_id: str
    path: Path
    kind: str
    labeled: bool


@dataclass
class DatasetCases:
    format: str  # msd-nifti, ssl4mis-h5, nifti-folder
    cases: list[CaseInput]
    class_names: dict[int, str]  # from the layout, background 0 included


def _strip(name: str) -> str:
    for e in _NIFTI_ENDINGS:
        if name.endswith(e):
            return name[: -len(e)]
    return name


def discover(data: Path) -> DatasetCases:
    """Every case of the dataset at `data`. Raises FileNotFoundError / ValueError naming the problem."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    if (root / "dataset.json").is_file():
        meta = json.loads((root / "dataset.json").read_text())
        names = parse_labels(meta.get("labels") or {"background": 0})
        cases = []
        for folder, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
            for cid, path in _case_files(root / folder).items():
                labeled = any((root / labels / f"{cid}{e}").is_file() for e in _NIFTI_ENDINGS)
                cases.append(CaseInput(cid, path, "nifti", labeled))
        return DatasetCases("msd-nifti", cases, names)
    if (root / "volumes").is_dir() and any((root / "volumes").glob("*.h5")):
        cases = []
        for path in sorted((root / "volumes").glob("*.h5")):
            try:
                with h5py.File(path, "r") as f:
                    labeled = "label" in f
            except OSError:
                labeled = False  # unreadable: reported when the case is read
            cases.append(CaseInput(path.stem, path, "h5", labeled))
        return DatasetCases("ssl4mis-h5", cases, {c.index: c.name for c in CARDIAC_CLASSES})
    files = [p for p in sorted(root.iterdir()) if p.is_file() and p.name.endswith(_NIFTI_ENDINGS) and not p.name.startswith(".")]
    if files:
        return DatasetCases("nifti-folder", [CaseInput(_strip(p.name), p, "nifti", False) for p in files], {0: "background"})
    raise ValueError(
        f"{root} holds no cases: expected dataset.json (nnU-Net/MSD), volumes/*.h5 (SSL4MIS) or .nii/.nii.gz files"
    )


def select(found: DatasetCases, cases: list[str] | None, mode: str) -> list[CaseInput]:
    """mode: "unlabeled" (cases without ground truth) or "all"; `cases` names cases explicitly."""
    if cases:
        by_id = {c.case_id: c for c in found.cases}
        unknown = [c for c in cases if c not in by_id]
        if unknown:
            raise ValueError(f"unknown case ids: {', '.join(unknown[:10])}")
        return [by_id[c] for c in cases]
    if mode == "all":
        return list(found.cases)
    if mode != "unlabeled":
        raise ValueError(f"selection must be 'unlabeled' or 'all', got {mode!r}")
    return [c for c in found.cases if not c.labeled]


def depth(case: CaseInput) -> int:
    """Slices of a case from its header alone (for the progress bar); 0 when it cannot be read."""
    try:
        if case.kind == "h5":
            with h5py.File(case.path, "r") as f:
                shape = f["image"].shape
                return int(shape[0]) if len(shape) == 3 else 1
        return nifti_geometry(case.path)[0][0]
    except Exception:
        return 0


def read_case(case: CaseInput) -> Volume:
    """The case as a slice-first Volume, image in [0, 1] (NIfTI: min-max per volume, as the data layer
    does for training; HDF5: as stored). Raises ValueError for anything unreadable or malformed."""
    if case.kind == "h5":
        try:
            with h5py.File(case.path, "r") as f:
                if "image" not in f:
                    raise ValueError(f"{case.path.name} has no 'image' dataset")
                image = np.asarray(f["image"][()], dtype=np.float32)
        except OSError as exc:
            raise ValueError(f"cannot read HDF5 {case.path.name}: {exc}") from None
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3 or min(image.shape) == 0:
            raise ValueError(f"{case.path.name}: expected a 3D image, got shape {image.shape}")
        if not np.isfinite(image).all():
            raise ValueError(f"{case.path.name} contains NaN or infinite values")
        return Volume(case.case_id, np.clip(image, 0.0, 1.0), meta={"source": str(case.path)})
    vol = load_nifti(case.path, case_id=case.case_id)
    if min(vol.image.shape) == 0:
        raise ValueError(f"{case.path.name}: empty image (shape {vol.image.shape})")
    vol.image = normalize_minmax(vol.image)
    return vol

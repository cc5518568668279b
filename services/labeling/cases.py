"""The cases of a dataset to label, in any layout VESSA reads, and how one is read.

Layouts: nnU-Net/MSD (`dataset.json`: imagesTr/ and imagesTs/), SSL4MIS HDF5 (`volumes/*.h5`), a
plain folder of `.nii`/`.nii.gz` files, or a folder of DICOM files (one case per series, its id the
SeriesInstanceUID; shared/data/dicom_series.py). A case is *labeled* when its layout holds a ground-truth
label for it (labelsTr/labelsTs file, an HDF5 `label` dataset); `--unlabeled` selects the others.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from shared.data.cine import is_cine_nifti, load_cine_nifti
from shared.data.classes import CARDIAC_CLASSES
from shared.data.dicom_series import SeriesRef, has_dicom, read_series, read_series_frames, scan_folder
from shared.data.msd_layout import _case_files, parse_labels
from shared.data.nifti import load_nifti, nifti_geometry, normalize_minmax, through_plane_axes
from shared.data.types import Volume
from shared.hashing import file_sha256

_NIFTI_ENDINGS = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseInput:
    """One volume to label. kind: "nifti", "cine" (a 4D NIfTI), "h5" or "dicom"; labeled: a ground truth exists in the
    layout. A DICOM case's `path` is the folder of its series' files, `series` the series itself."""

    case_id: str
    path: Path
    kind: str
    labeled: bool
    series: SeriesRef | None = None


@dataclass
class DatasetCases:
    format: str  # msd-nifti, ssl4mis-h5, nifti-folder, dicom-folder
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
        cases = [CaseInput(_strip(p.name), p, "cine" if is_cine_nifti(p) else "nifti", False) for p in files]
        return DatasetCases("nifti-folder", cases, {0: "background"})
    if has_dicom(root):
        cases = [CaseInput(s.case_id, _common_folder(s.files), "dicom", False, s) for s in scan_folder(root)]
        return DatasetCases("dicom-folder", cases, {0: "background"})
    raise ValueError(
        f"{root} holds no cases: expected dataset.json (nnU-Net/MSD), volumes/*.h5 (SSL4MIS), .nii/.nii.gz "
        "files or DICOM files"
    )


def _common_folder(files: tuple[Path, ...]) -> Path:
    parents = {p.parent for p in files}
    return parents.pop() if len(parents) == 1 else Path(*_common_parts([p.parent.parts for p in files]))


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return tuple(out) or ("/",)


def input_sha256(case: CaseInput) -> str:
    """The case's input content hash (the resume key): the file's SHA-256, or for a DICOM series the
    SHA-256 of its files' hashes in name order (a changed, added or removed instance changes it)."""
    if case.kind != "dicom" or case.series is None:
        return file_sha256(case.path)
    h = hashlib.sha256()
    for p in sorted(case.series.files):
        h.update(f"{p.name}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def case_input(case_id: str, path: Path) -> CaseInput:
    """The case a record names (its id and input path), for the review page and the ranking: a folder is
    a DICOM series (found again by its UID), a 4D NIfTI a cine. FileNotFoundError when it is gone."""
    path = Path(path)
    if path.is_dir():
        found = [s for s in scan_folder(path) if s.case_id == case_id]
        if not found:
            raise FileNotFoundError(f"series {case_id} is no longer in {path}")
        return CaseInput(case_id, path, "dicom", False, found[0])
    if path.name.endswith(".h5"):
        return CaseInput(case_id, path, "h5", False)
    return CaseInput(case_id, path, "cine" if is_cine_nifti(path) else "nifti", False)


def select(found: DatasetCases, cases: list[str] | None, mode: str) -> list[CaseInput]:
    """mode: "unlabeled" (cases without ground truth) or "all"; `cases` names cases explicitly."""
    if cases:
        by_id = {c.case_id: c for c in found.cases}
        unknown = [c for c in cases if c not in by_id]
        if unknown and found.format == "dicom-folder":
            listed = ", ".join(c.case_id for c in found.cases[:10])
            raise ValueError(f"no series {', '.join(unknown[:10])} in the folder; series found: {listed or 'none'}")
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
        if case.kind == "dicom":
            return sum(int(_frames_of(p)) for p in case.series.files) if case.series else 0
        if case.kind == "cine":
            import nibabel as nib

            img = nib.load(str(case.path))
            axis = through_plane_axes(tuple(float(z) for z in img.header.get_zooms()[:3]))[0]
            return int(img.shape[3]) * int(img.shape[axis])  # frames × slices
        if case.kind == "h5":
            with h5py.File(case.path, "r") as f:
                shape = f["image"].shape
                return int(shape[0]) if len(shape) == 3 else 1
        return nifti_geometry(case.path)[0][0]
    except Exception:
        return 0


def _frames_of(path: Path) -> int:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
    return int(ds.get("NumberOfFrames", 1) or 1)


def read_cine_case(case: CaseInput) -> list[Volume]:
    """A 4D cine case (a 4D NIfTI, or a DICOM series of several temporal positions) as one Volume per
    frame, min-max normalised over the whole cine (one intensity scale for every frame, so the cycle's
    frames look alike to the assistant). A DICOM series of one temporal position gives one Volume,
    normalised like `read_case`'s."""
    if case.kind == "dicom":
        if case.series is None:
            raise ValueError(f"{case.case_id}: no DICOM series")
        frames = read_series_frames(case.series, case_id=case.case_id)
    else:
        frames = load_cine_nifti(case.path, case_id=case.case_id)
    lo = min(float(f.image.min()) for f in frames)
    hi = max(float(f.image.max()) for f in frames)
    for f in frames:
        f.image = np.zeros_like(f.image) if hi <= lo else ((f.image - lo) / (hi - lo)).astype(np.float32)
    return frames


def read_case(case: CaseInput) -> Volume:
    """The case as a slice-first Volume, image in [0, 1] (NIfTI and DICOM: min-max per volume, as the
    data layer does for training; HDF5: as stored). Raises ValueError for anything unreadable or
    malformed (a DICOM series: `DicomInputError` naming the problem)."""
    if case.kind == "dicom":
        if case.series is None:
            raise ValueError(f"{case.case_id}: no DICOM series")
        vol = read_series(case.series, case_id=case.case_id)
        vol.image = normalize_minmax(vol.image)
        return vol
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

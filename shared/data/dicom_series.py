"""DICOM input: a folder of one or several series → one case per series, read as a slice-first Volume.

`scan_folder(root)` reads headers only (no pixel data) and groups the DICOM files under `root` by
SeriesInstanceUID; `read_series(series)` checks the series and stacks it:

- single-frame images (one instance per slice) or an enhanced multi-frame image (per-frame functional
  groups), MR, CT or any other image SOP class;
- slices ordered by their position along the slice normal (highdicom's `get_volume_positions`, not a
  sort of our own), the affine from ImagePositionPatient / ImageOrientationPatient / PixelSpacing and the
  slice spacing (highdicom's `VolumeGeometry`), turned from DICOM's LPS into NIfTI's RAS;
- a cine series (several temporal positions: TemporalPositionIdentifier, TriggerTime or the enhanced
  FrameContentSequence's TemporalPositionIndex) is read frame by frame by `read_series_frames`.

Every problem is a `DicomInputError` (a ValueError) naming it: a non-image object (SR, PR, a SEG), mixed
series (instances that differ in SOP class, frame of reference or matrix size), inconsistent orientation
or pixel spacing, duplicated or missing slices, irregular slice spacing, a transfer syntax no installed
decoder handles, a series over `max_voxels`. Callers report it for that case and go on with the others.

The Volume's `meta["dicom"]` is a `DicomSource`: the instances' headers (no pixels), the volume's
highdicom geometry and the source order; `shared.data.dicom_seg` needs them to write a DICOM-SEG that
references the source instances.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from shared.data.types import Volume

#: a series over this many voxels (all frames) is refused before its pixel data is read: 2 GB float32
DEFAULT_MAX_VOXELS = 512 * 512 * 2048

_HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
]

# Storage classes that hold no image to label (results and documents), named in the error.
_NON_IMAGE_KEYWORDS = ("SR", "PresentationState", "KeyObjectSelection", "Segmentation", "RTStructure", "Waveform", "EncapsulatedPDF", "Report", "Document")


class DicomInputError(ValueError):
    """A DICOM series VESSA cannot label, with the reason (a per-case error, 4xx over REST)."""


@dataclass(frozen=True)
class SeriesRef:
    """One series found in a folder: its files and what its headers say (no pixel data read)."""

    series_uid: str
    study_uid: str
    files: tuple[Path, ...]
    modality: str = ""
    description: str = ""
    number: int | None = None
    sop_classes: tuple[str, ...] = ()

    @property
    def case_id(self) -> str:
        # The series UID itself (digits and dots): unique, and what `--series UID` names.
        return self.series_uid


@dataclass
class DicomSource:
    """Where a DICOM Volume came from: what a DICOM-SEG of it must reference."""

    series_uid: str
    study_uid: str
    datasets: list[Dataset]  # headers of the instances (pixel data dropped), in file order
    geometry: object  # highdicom.VolumeGeometry of the volume (slices in the Volume's order)
    frame_of_reference_uid: str
    temporal_index: int | None = None  # for a cine frame: its 0-based temporal position
    extra: dict = field(default_factory=dict)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 'DICM' after the 128-byte preamble."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _files(root: Path) -> Iterable[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            yield p


def has_dicom(root: Path, limit: int = 200) -> bool:
    """Whether a folder holds DICOM files (looks at the first `limit` files only)."""
    for i, p in enumerate(_files(Path(root))):
        if i >= limit:
            return False
        if is_dicom_file(p):
            return True
    return False


def scan_folder(root: str | Path) -> list[SeriesRef]:
    """Every series under `root` (recursively), by SeriesInstanceUID, sorted by series number then UID.

    Reads headers only. Files that are not DICOM (no 'DICM' marker) and DICOMDIR files are ignored; a
    DICOM file without a SeriesInstanceUID becomes a series of its own named after the file, whose read
    fails with the reason."""
    root = Path(root)
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path in _files(root):
        if not is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            groups[f"unreadable-{path.name}"].append((path, Dataset()))
            groups[f"unreadable-{path.name}"][-1][1].VessaError = str(exc)  # type: ignore[attr-defined]
            continue
        if ds.file_meta.get("MediaStorageSOPClassUID") == "1.2.840.10008.1.3.10":  # DICOMDIR
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or f"no-series-{path.name}")
        groups[uid].append((path, ds))
    out = []
    for uid, members in groups.items():
        first = members[0][1]
        number = first.get("SeriesNumber")
        out.append(
            SeriesRef(
                series_uid=uid,
                study_uid=str(first.get("StudyInstanceUID", "")),
                files=tuple(p for p, _ in members),
                modality=str(first.get("Modality", "")),
                description=str(first.get("SeriesDescription", "")),
                number=int(number) if number not in (None, "") else None,
                sop_classes=tuple(sorted({str(d.get("SOPClassUID", "")) for _, d in members})),
            )
        )
    return sorted(out, key=lambda s: (s.number if s.number is not None else 1 << 30, s.series_uid))


# -- one series ------------------------------------------------------------------------------------


@dataclass
class _Frame:
    """One 2D image of a series: an instance (single-frame) or one frame of a multi-frame instance."""

    ds_index: int
    frame: int | None  # 0-based frame of a multi-frame instance, None for a single-frame one
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    temporal: float | None


def _sop_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid or "unknown SOP class"


def _is_non_image(uid: str) -> bool:
    kw = UID(uid).keyword or ""
    return any(k in kw for k in _NON_IMAGE_KEYWORDS)


def _fg(ds: Dataset, frame: int, seq: str, attr: str):
    """An attribute of an enhanced image's functional groups: per-frame first, then shared."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and frame < len(per):
        item = per[frame].get(seq)
        if item is not None and len(item) and attr in item[0]:
            return item[0].get(attr)
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and len(shared):
        item = shared[0].get(seq)
        if item is not None and len(item) and attr in item[0]:
            return item[0].get(attr)
    return None


def _temporal_single(ds: Dataset) -> float | None:
    for key in ("TemporalPositionIdentifier", "TriggerTime"):
        v = ds.get(key)
        if v not in (None, ""):
            return float(v)
    return None


def _frames(datasets: list[Dataset], where: str) -> list[_Frame]:
    frames: list[_Frame] = []
    for i, ds in enumerate(datasets):
        n = int(ds.get("NumberOfFrames", 1) or 1)
        if "PerFrameFunctionalGroupsSequence" in ds:
            for f in range(n):
                pos = _fg(ds, f, "PlanePositionSequence", "ImagePositionPatient")
                ori = _fg(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
                spc = _fg(ds, f, "PixelMeasuresSequence", "PixelSpacing")
                if pos is None or ori is None or spc is None:
                    raise DicomInputError(f"{where}: frame {f + 1} has no plane position, orientation or pixel spacing")
                tpi = _fg(ds, f, "FrameContentSequence", "TemporalPositionIndex")
                if tpi is None:
                    tpi = _fg(ds, f, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")
                frames.append(_Frame(i, f, np.asarray(pos, float), np.asarray(ori, float), (float(spc[0]), float(spc[1])), None if tpi is None else float(tpi)))
        else:
            if n > 1:
                raise DicomInputError(f"{where}: multi-frame instance without per-frame functional groups is not supported")
            pos, ori, spc = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")
            if pos is None or ori is None or spc is None:
                raise DicomInputError(f"{where}: instance {ds.get('InstanceNumber', i + 1)} has no ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
            frames.append(_Frame(i, None, np.asarray(pos, float), np.asarray(ori, float), (float(spc[0]), float(spc[1])), _temporal_single(ds)))
    return frames


def _check_consistent(datasets: list[Dataset], where: str) -> None:
    """Mixed series, non-image objects and sizes: all from headers."""
    classes = {str(ds.get("SOPClassUID", "")) for ds in datasets}
    bad = sorted(c for c in classes if _is_non_image(c) or not c)
    if bad:
        raise DicomInputError(f"{where}: not an image series ({', '.join(_sop_name(c) for c in bad)}); nothing to label")
    if len(classes) > 1:
        raise DicomInputError(f"{where}: mixed series: instances of several SOP classes ({', '.join(sorted(_sop_name(c) for c in classes))})")
    if any("Rows" not in ds or "Columns" not in ds for ds in datasets):  # headers: pixel data not loaded
        raise DicomInputError(f"{where}: instances without an image ({_sop_name(next(iter(classes)))}); nothing to label")
    frames_of_ref = {str(ds.get("FrameOfReferenceUID", "")) for ds in datasets}
    if len(frames_of_ref) > 1:
        raise DicomInputError(f"{where}: mixed series: {len(frames_of_ref)} frames of reference in one series")
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets}
    if len(sizes) > 1:
        raise DicomInputError(f"{where}: mixed series: images of several matrix sizes {sorted(sizes)}")
    if any(int(ds.get("SamplesPerPixel", 1)) != 1 for ds in datasets):
        raise DicomInputError(f"{where}: colour images are not supported (SamplesPerPixel != 1)")


def _check_transfer_syntax(datasets: list[Dataset], where: str) -> None:
    from pydicom.pixels import get_decoder

    for uid in sorted({str(ds.file_meta.get("TransferSyntaxUID", "")) for ds in datasets if hasattr(ds, "file_meta")}):
        if not uid:
            continue
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            raise DicomInputError(f"{where}: unsupported transfer syntax {uid} ({_sop_name(uid)}): no pixel data decoder") from None
        if not decoder.is_available:
            raise DicomInputError(
                f"{where}: unsupported transfer syntax {uid} ({_sop_name(uid)}): no installed decoder plugin "
                "(install pylibjpeg with pylibjpeg-libjpeg/-openjpeg, or pyjpegls)"
            )


def _stack_order(frames: list[_Frame], where: str) -> tuple[list[int], float]:
    """Indices of `frames` in volume order and the slice spacing, or a DicomInputError naming what is wrong."""
    from highdicom.spatial import get_volume_positions

    ori0 = frames[0].orientation
    for f in frames[1:]:
        if not np.allclose(f.orientation, ori0, atol=1e-4):
            raise DicomInputError(f"{where}: inconsistent orientation: {list(np.round(f.orientation, 4))} vs {list(np.round(ori0, 4))}")
        if not np.allclose(f.pixel_spacing, frames[0].pixel_spacing, rtol=1e-4):
            raise DicomInputError(f"{where}: inconsistent pixel spacing: {f.pixel_spacing} vs {frames[0].pixel_spacing}")
    if len(frames) == 1:
        return [0], 0.0
    positions = np.stack([f.position for f in frames])
    normal = np.cross(ori0[:3], ori0[3:])
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    gaps = np.diff(dist[order])
    dup = np.flatnonzero(np.abs(gaps) < 1e-3)
    if dup.size:
        d = float(dist[order][dup[0]])
        raise DicomInputError(f"{where}: duplicated slices: {dup.size + 1} images at {d:.2f} mm along the slice normal")
    spacing, index = get_volume_positions(positions, ori0)
    if spacing is not None:
        return [index.index(i) for i in range(len(frames))], float(spacing)
    spacing_m, _ = get_volume_positions(positions, ori0, allow_missing_positions=True)
    if spacing_m is not None:
        missing = int(round(float(np.sum(np.rint(gaps / spacing_m) - 1))))
        raise DicomInputError(f"{where}: missing slices: {missing} gap(s) of {spacing_m:.2f} mm in a stack of {len(frames)}")
    rel = positions - positions[order[0]]
    off_normal = np.linalg.norm(rel - np.outer(rel @ normal, normal), axis=1).max()
    if off_normal > 1e-2 * max(1.0, float(np.abs(gaps).max())):
        raise DicomInputError(f"{where}: slices are not stacked along their normal (sheared by {off_normal:.2f} mm)")
    raise DicomInputError(f"{where}: inconsistent slice spacing: {gaps.min():.2f} to {gaps.max():.2f} mm between slices")


def _pixels(datasets_full: list[Dataset], frames: list[_Frame]) -> np.ndarray:
    """(N, H, W) float32 in modality units (rescale slope/intercept applied), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    cache: dict[int, np.ndarray] = {}
    out = []
    for f in frames:
        ds = datasets_full[f.ds_index]
        if f.ds_index not in cache:
            arr = ds.pixel_array
            if f.frame is None:
                arr = apply_modality_lut(arr, ds).astype(np.float32)
            cache[f.ds_index] = arr
        arr = cache[f.ds_index]
        if f.frame is not None:
            frame = arr[f.frame] if arr.ndim == 3 else arr
            slope = _fg(ds, f.frame, "PixelValueTransformationSequence", "RescaleSlope")
            inter = _fg(ds, f.frame, "PixelValueTransformationSequence", "RescaleIntercept")
            frame = frame.astype(np.float32) * float(slope if slope is not None else 1.0) + float(inter if inter is not None else 0.0)
        else:
            frame = arr
        if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
            frame = frame.max() - frame
        out.append(np.asarray(frame, np.float32))
    return np.stack(out)


def _nifti_header(affine: np.ndarray, shape_xyz: tuple[int, int, int]) -> nib.Nifti1Header:
    """A NIfTI header with scanner-anchored qform/sform, so label maps written back carry code 1."""
    img = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine)
    hdr = img.header
    hdr.set_data_shape(shape_xyz)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    return hdr


def _read_headers(series: SeriesRef, where: str) -> list[Dataset]:
    out = []
    for p in series.files:
        try:
            out.append(pydicom.dcmread(p, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise DicomInputError(f"{where}: cannot read {p.name}: {exc}") from None
    return out


def _temporal_groups(frames: list[_Frame]) -> list[list[int]]:
    """Frame indices per temporal position (one group when the series is not a cine)."""
    keys = sorted({f.temporal for f in frames if f.temporal is not None})
    if len(keys) <= 1 or any(f.temporal is None for f in frames):
        return [list(range(len(frames)))]
    groups = [[i for i, f in enumerate(frames) if f.temporal == k] for k in keys]
    # A cine repeats the same slice positions at every temporal position. A single-phase series whose
    # slices merely carry different trigger times does not: it stays one stack.
    spots = [sorted(tuple(np.round(frames[i].position, 2)) for i in g) for g in groups]
    return groups if all(s == spots[0] for s in spots) else [list(range(len(frames)))]


def read_series_frames(
    series: SeriesRef, *, max_voxels: int = DEFAULT_MAX_VOXELS, case_id: str | None = None
) -> list[Volume]:
    """The series as one Volume per temporal position (one for a plain 3D series): image (D, H, W)
    float32 in modality units, spacing (z, y, x) mm, a NIfTI RAS affine with axes (x=column, y=row,
    z=slice), `meta["dicom"]` a DicomSource. Every cine frame must have the same geometry.
    Raises DicomInputError for anything that cannot be labeled."""
    from highdicom import VolumeGeometry

    where = f"series {series.series_uid}"
    if series.series_uid.startswith(("unreadable-", "no-series-")):
        raise DicomInputError(f"{where}: not a readable DICOM series (no SeriesInstanceUID, or a damaged file)")
    headers = _read_headers(series, where)
    _check_consistent(headers, where)
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    n_frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in headers)
    if rows * cols * n_frames > max_voxels:
        raise DicomInputError(f"{where}: oversized: {rows}x{cols}x{n_frames} = {rows * cols * n_frames} voxels, over the limit of {max_voxels}")
    _check_transfer_syntax(headers, where)
    frames = _frames(headers, where)
    groups = _temporal_groups(frames)
    plans = []
    for g, members in enumerate(groups):
        gw = where if len(groups) == 1 else f"{where} (temporal position {g + 1})"
        sub = [frames[i] for i in members]
        order, spacing = _stack_order(sub, gw)
        plans.append([sub[i] for i in order])
        if spacing == 0.0:  # one slice: the spacing is its thickness
            spacing = float(headers[0].get("SpacingBetweenSlices") or headers[0].get("SliceThickness") or 1.0)
        plans[-1] = (plans[-1], spacing)
    first_positions = [np.round(p[0][0].position, 3).tolist() for p in plans]
    if len({len(p[0]) for p in plans}) > 1 or any(fp != first_positions[0] for fp in first_positions):
        raise DicomInputError(f"{where}: cine frames differ in geometry (slice counts {sorted({len(p[0]) for p in plans})})")
    try:
        full = [pydicom.dcmread(p) for p in series.files]
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DicomInputError(f"{where}: cannot read pixel data: {exc}") from None
    volumes = []
    cid = case_id or series.case_id
    for t, (ordered, spacing) in enumerate(plans):
        try:
            image = _pixels(full, ordered)
        except (ValueError, RuntimeError, NotImplementedError, AttributeError) as exc:
            raise DicomInputError(f"{where}: cannot decode pixel data: {exc}") from None
        if not np.isfinite(image).all():
            raise DicomInputError(f"{where}: pixel data holds NaN or infinite values")
        f0 = ordered[0]
        geometry = VolumeGeometry.from_attributes(
            image_position=f0.position.tolist(),
            image_orientation=f0.orientation.tolist(),
            rows=rows,
            columns=cols,
            pixel_spacing=list(f0.pixel_spacing),
            spacing_between_slices=spacing,
            number_of_frames=len(ordered),
            coordinate_system="PATIENT",
            frame_of_reference_uid=str(headers[0].get("FrameOfReferenceUID", "")) or None,
        )
        # highdicom's affine maps (slice, row, column) to RAS; NIfTI's array is (column, row, slice).
        affine = np.asarray(geometry.get_affine("RAH"), np.float64)[:, [2, 1, 0, 3]]
        shape_xyz = (cols, rows, len(ordered))
        sources = headers
        if len(plans) > 1 and all(f.frame is None for f in ordered):
            # a cine of single-frame instances: a frame's SEG references that frame's instances only
            sources = [headers[i] for i in sorted({f.ds_index for f in ordered})]
        volumes.append(
            Volume(
                case_id=cid if len(plans) == 1 else f"{cid}_t{t:02d}",
                image=image,
                spacing=(spacing, f0.pixel_spacing[0], f0.pixel_spacing[1]),
                affine=affine,
                header=_nifti_header(affine, shape_xyz),
                meta={
                    "axes": (2, 1, 0),
                    "nifti_shape": shape_xyz,
                    "source": str(Path(series.files[0]).parent),
                    **({"frame": t} if len(plans) > 1 else {}),
                    "dicom": DicomSource(
                        series_uid=series.series_uid,
                        study_uid=series.study_uid,
                        datasets=sources,
                        geometry=geometry,
                        frame_of_reference_uid=str(headers[0].get("FrameOfReferenceUID", "")),
                        temporal_index=t if len(plans) > 1 else None,
                    ),
                },
            )
        )
    return volumes


def read_series(series: SeriesRef, *, max_voxels: int = DEFAULT_MAX_VOXELS, case_id: str | None = None) -> Volume:
    """A 3D series as one Volume (see `read_series_frames`); a cine series is refused with the hint to
    label it frame by frame."""
    frames = read_series_frames(series, max_voxels=max_voxels, case_id=case_id)
    if len(frames) > 1:
        raise DicomInputError(f"series {series.series_uid}: a cine series of {len(frames)} frames; read it with read_series_frames")
    return frames[0]


def pick_series(found: list[SeriesRef], series_uid: str | None) -> list[SeriesRef]:
    """`found`, or only the series `series_uid` (a ValueError listing the UIDs when it is not there)."""
    if series_uid is None:
        return found
    picked = [s for s in found if s.series_uid == series_uid]
    if not picked:
        listed = ", ".join(s.series_uid for s in found[:10])
        raise ValueError(f"no series {series_uid} in the folder; series found: {listed or 'none'}")
    return picked

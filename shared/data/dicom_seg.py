"""DICOM-SEG output: a label map of a DICOM series as a Segmentation instance that references the source
instances (highdicom), so a PACS and 3D Slicer show it on the scan it was made from.

One segment per class asked for, numbered 1..K in class order, each with its name, a coded category and
type (SNOMED CT for the cardiac classes; a private `99VESSA` code for a class VESSA has no code for) and
the algorithm that made it: VESSA, with the model and template-bank versions as the algorithm version.
Per-class confidence stays in the job manifest. The label map is handed to highdicom as a Volume in
the source's geometry, so highdicom maps its slices onto the source frames (single-frame or enhanced).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.sr.codedict import codes

from shared.data.types import Volume

SOFTWARE = "VESSA"
PRIVATE_SCHEME = "99VESSA"

# name (lower case) → (category, type): SNOMED CT codes from pydicom's code dictionary
_CARDIAC = {
    "rv": (codes.SCT.AnatomicalStructure, codes.SCT.RightVentricle),
    "right ventricle": (codes.SCT.AnatomicalStructure, codes.SCT.RightVentricle),
    "myo": (codes.SCT.AnatomicalStructure, codes.SCT.LeftVentricleMyocardium),
    "myocardium": (codes.SCT.AnatomicalStructure, codes.SCT.LeftVentricleMyocardium),
    "lv": (codes.SCT.AnatomicalStructure, codes.SCT.LeftVentricle),
    "left ventricle": (codes.SCT.AnatomicalStructure, codes.SCT.LeftVentricle),
    "heart": (codes.SCT.AnatomicalStructure, codes.SCT.Heart),
}


@dataclass(frozen=True)
class Algorithm:
    """What made the labels: named in every segment's AlgorithmIdentificationSequence."""

    model_version: str
    bank_version: int
    name: str = SOFTWARE

    @property
    def version(self) -> str:
        # a student alone (`vessa predict`) has no template bank: bank_version -1, left out
        bank = f"; bank {self.bank_version}" if self.bank_version >= 0 else ""
        return f"model {self.model_version or 'unknown'}{bank}"[:64]


def class_codes(name: str, index: int):
    """(category, type) codes of a class: SNOMED CT where VESSA knows the structure, else a private code."""
    from highdicom.sr import CodedConcept

    known = _CARDIAC.get(name.strip().lower())
    if known is not None:
        return known
    return (
        codes.SCT.Tissue,
        CodedConcept(value=f"class-{index}", scheme_designator=PRIVATE_SCHEME, meaning=(name or f"class {index}")[:64]),
    )


def build_seg(
    label_dhw: np.ndarray,
    like: Volume,
    class_names: dict[int, str],
    class_ids: list[int],
    algorithm: Algorithm,
    series_number: int = 9901,
):
    """The Segmentation dataset (highdicom) of `label_dhw` (class indices, the Volume's grid) on the DICOM
    series `like` was read from (`like.meta["dicom"]`, see shared.data.dicom_series)."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    src = (like.meta or {}).get("dicom")
    if src is None:
        raise ValueError(f"{like.case_id}: not read from DICOM; a DICOM-SEG needs the source instances")
    label = np.asarray(label_dhw)
    if label.shape != like.image.shape:
        raise ValueError(f"label shape {label.shape} differs from the image shape {like.image.shape}")
    ids = sorted(set(class_ids))
    if not ids:
        raise ValueError("no classes to write")
    # segment numbers are 1..K in class order (a job may ask for classes 1 and 3 only)
    lut = np.zeros(256, np.uint8)
    for seg_no, k in enumerate(ids, start=1):
        lut[k] = seg_no
    seg_array = lut[label.astype(np.uint8)]
    family = codes.cid7162.ArtificialIntelligence
    ident = hd.AlgorithmIdentificationSequence(name=algorithm.name, family=family, version=algorithm.version)
    descriptions = []
    for seg_no, k in enumerate(ids, start=1):
        name = class_names.get(k, f"class_{k}")
        category, kind = class_codes(name, k)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=seg_no,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=ident,
                tracking_id=f"{name} ({like.case_id})"[:64],
                tracking_uid=generate_uid(),
            )
        )
    volume = hd.Volume(
        array=seg_array,
        affine=src.geometry.affine,
        coordinate_system="PATIENT",
        frame_of_reference_uid=src.frame_of_reference_uid or None,
    )
    return hd.seg.Segmentation(
        source_images=src.datasets,
        pixel_array=volume,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name=f"{SOFTWARE} pseudo-labels",
        software_versions=algorithm.version,
        device_serial_number="0",
        content_description="VESSA pseudo-labels"[:64],
        content_label="VESSA",
        omit_empty_frames=True,
    )


def seg_bytes(seg) -> bytes:
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def read_seg_labelmap(path_or_bytes: str | Path | bytes, like: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM-SEG read back with highdicom as a label map in `like`'s grid (D, H, W): each segment's
    pixels set to its segment number; and {segment number: label}. The check that a SEG says what VESSA
    meant it to say."""
    import highdicom as hd

    src = like.meta["dicom"]
    data = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    seg = hd.seg.segread(data)
    numbers = list(seg.segment_numbers)
    vol = seg.get_volume(combine_segments=True, relabel=False, segment_numbers=numbers)
    # Resample-free: bring the SEG's volume into the source geometry (same grid, maybe another slice order).
    out = np.zeros(like.image.shape, np.uint8)
    target = hd.VolumeGeometry(affine=src.geometry.affine, spatial_shape=like.image.shape, coordinate_system="PATIENT")
    matched = vol.match_geometry(target)
    out[:] = np.asarray(matched.array, np.uint8)
    names = {n: seg.get_segment_description(n).segment_label for n in numbers}
    return out, names

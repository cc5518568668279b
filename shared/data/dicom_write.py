"""Write a volume as a DICOM series: the synthetic scanner output that tests and `vessa data synth --dicom`
use, so DICOM input is exercised on data with known geometry and ground truth.

One MR Image Storage instance per slice (single-frame, the way most scanners send MR and CT), or one
Legacy Converted Enhanced MR multi-frame instance (`enhanced=True`, made by highdicom from the single
frames), in any transfer syntax pydicom can encode (native, RLE Lossless, JPEG-LS, JPEG 2000 with the
pylibjpeg plugins). A 4D cine (T, D, H, W) is written as one series whose instances carry the frame's
TriggerTime and TemporalPositionIdentifier, as scanners do.

Geometry: `orientation` is DICOM's ImageOrientationPatient (row direction, then column direction, LPS),
slice k lies at `origin + k * spacing[0] * normal` where normal = row × col; PixelSpacing is
(spacing[1], spacing[2]) = (between rows, between columns).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _base_dataset(study_uid: str, series_uid: str, frame_uid: str, series_number: int, description: str, patient_id: str) -> Dataset:
    now = datetime.datetime(2026, 1, 1, 12, 0, 0)  # fixed: the same inputs give the same headers
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.PatientName = f"VESSA^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDate = ds.StudyDate
    ds.AcquisitionTime = ds.StudyTime
    ds.Modality = "MR"
    ds.Manufacturer = "VESSA synthetic"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "HEART"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = 1.5
    ds.RepetitionTime = 3.0
    ds.EchoTrainLength = 1
    ds.MagneticFieldStrength = 1.5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed: int16 voxels
    return ds


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def write_dicom_series(
    image: np.ndarray,
    spacing: Sequence[float],
    out_dir: str | Path,
    *,
    orientation: Sequence[float] = AXIAL,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    description: str = "VESSA synthetic",
    patient_id: str = "synth",
    transfer_syntax: str = ExplicitVRLittleEndian,
    enhanced: bool = False,
    frame_interval_ms: float = 40.0,
    name_prefix: str = "",
) -> list[Path]:
    """Write `image` — (D, H, W) or cine (T, D, H, W), integer intensities fitting int16 — as one DICOM
    series under `out_dir`; returns the files written (one per slice, or one multi-frame file)."""
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[None]
        temporal = False
    elif arr.ndim == 4:
        temporal = True
    else:
        raise ValueError(f"expected a (D, H, W) volume or a (T, D, H, W) cine, got shape {arr.shape}")
    if arr.min() < -32768 or arr.max() > 32767:
        raise ValueError("intensities must fit int16")
    arr = np.rint(arr).astype(np.int16)
    dz, dy, dx = (float(s) for s in spacing)
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    t_count, d_count, rows, cols = arr.shape
    single_series = generate_uid() if enhanced else series_uid  # the converted image is `series_uid`
    singles: list[Dataset] = []
    for t in range(t_count):
        for k in range(d_count):
            ds = _base_dataset(study_uid, single_series, frame_uid, series_number, description, patient_id)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = t * d_count + k + 1
            ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
            ds.ImagePositionPatient = [round(float(v), 6) for v in np.asarray(origin, float) + k * dz * normal]
            ds.SliceLocation = round(k * dz, 6)
            ds.PixelSpacing = [dy, dx]
            ds.SliceThickness = dz
            ds.SpacingBetweenSlices = dz
            ds.Rows, ds.Columns = rows, cols
            if temporal:
                ds.TriggerTime = round(t * frame_interval_ms, 3)
                ds.TemporalPositionIdentifier = t + 1
                ds.NumberOfTemporalPositions = t_count
                ds.CardiacNumberOfImages = t_count
            ds.PixelData = arr[t, k].tobytes()
            ds.file_meta = _file_meta(ds)
            singles.append(ds)
    if enhanced:
        from highdicom.legacy import LegacyConvertedEnhancedMRImage

        multi = LegacyConvertedEnhancedMRImage(
            legacy_datasets=singles,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=1,
        )
        multi.SeriesDescription = description
        datasets = [multi]
    else:
        datasets = singles
    paths = []
    for i, ds in enumerate(datasets):
        ds.file_meta = _file_meta(ds)
        if UID(transfer_syntax) != ExplicitVRLittleEndian:
            ds.compress(UID(transfer_syntax))  # encodes the native pixel data with pydicom's plugins
        path = out / f"{name_prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

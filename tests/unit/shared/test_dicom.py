"""DICOM input (shared/data/dicom_series.py) and DICOM-SEG output (shared/data/dicom_seg.py) on series
written by shared/data/dicom_write.py: geometry, slice order, enhanced and compressed series, the bad
inputs, and SEG files read back with highdicom."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, RLELossless

from shared.data.dicom_seg import Algorithm, build_seg, read_seg_labelmap, seg_bytes
from shared.data.dicom_series import (
    DicomInputError,
    pick_series,
    read_series,
    read_series_frames,
    scan_folder,
)
from shared.data.dicom_write import write_dicom_series
from shared.data.nifti import label_to_nifti

OBLIQUE = (0.8660254, 0.5, 0.0, 0.0, 0.0, -1.0)  # rows rotated 30° in the axial plane, columns foot-ward


def _volume(d=5, h=12, w=10, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, size=(d, h, w)).astype(np.int16)


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.array([*ijk, 1.0]))[:3]


def test_single_frame_series_geometry_and_order(tmp_path: Path) -> None:
    img = _volume()
    files = write_dicom_series(img, (4.0, 1.5, 2.0), tmp_path / "s", orientation=OBLIQUE, origin=(10.0, -20.0, 30.0))
    random.Random(0).shuffle(files)  # file order must not matter
    for i, p in enumerate(files):
        p.rename(p.with_name(f"x{i:03d}.dcm"))
    (series,) = scan_folder(tmp_path)
    vol = read_series(series)
    assert vol.image.shape == img.shape and vol.image.dtype == np.float32
    assert vol.spacing == pytest.approx((4.0, 1.5, 2.0))
    # every voxel lands where its DICOM instance says it is (LPS → RAS), whatever order highdicom chose
    normal = np.cross(OBLIQUE[:3], OBLIQUE[3:])
    for path in scan_folder(tmp_path)[0].files:
        ds = pydicom.dcmread(path)
        k = [z for z in range(img.shape[0]) if np.array_equal(vol.image[z], ds.pixel_array.astype(np.float32))]
        assert len(k) == 1
        lps = np.asarray(ds.ImagePositionPatient, float)
        ras = lps * np.array([-1, -1, 1])
        assert np.allclose(_world(vol.affine, (0, 0, k[0])), ras, atol=1e-4)  # NIfTI (col, row, slice)
        col_step = np.asarray(OBLIQUE[:3]) * 2.0 * np.array([-1, -1, 1])
        assert np.allclose(_world(vol.affine, (1, 0, k[0])) - ras, col_step, atol=1e-4)
    # slices are stacked monotonically along the normal
    dists = [float(_world(vol.affine, (0, 0, z)) @ (normal * np.array([-1, -1, 1]))) for z in range(img.shape[0])]
    assert np.all(np.diff(dists) < 0) or np.all(np.diff(dists) > 0)
    assert abs(abs(dists[1] - dists[0]) - 4.0) < 1e-4
    # the label map written back as NIfTI keeps that geometry (scanner-anchored codes)
    nii = label_to_nifti(np.ones(img.shape, np.uint8), vol)
    assert nii.shape == (10, 12, 5) and np.allclose(nii.affine, vol.affine)
    assert int(nii.header["sform_code"]) == 1 and int(nii.header["qform_code"]) == 1


def test_two_series_and_pick(tmp_path: Path) -> None:
    a = write_dicom_series(_volume(seed=1), (5, 1, 1), tmp_path / "a", series_number=2)
    write_dicom_series(_volume(d=3, seed=2), (5, 1, 1), tmp_path / "b", series_number=1)
    (tmp_path / "README.txt").write_text("not DICOM")
    found = scan_folder(tmp_path)
    assert [len(s.files) for s in found] == [3, 5]  # by series number
    uid = pydicom.dcmread(a[0]).SeriesInstanceUID
    (picked,) = pick_series(found, uid)
    assert read_series(picked).image.shape == (5, 12, 10)
    with pytest.raises(ValueError, match="no series 1.2.3"):
        pick_series(found, "1.2.3")


def test_enhanced_multiframe_matches_single_frame(tmp_path: Path) -> None:
    img = _volume(d=4)
    write_dicom_series(img, (3.0, 1.0, 1.25), tmp_path / "single", orientation=OBLIQUE)
    write_dicom_series(img, (3.0, 1.0, 1.25), tmp_path / "multi", orientation=OBLIQUE, enhanced=True)
    single = read_series(scan_folder(tmp_path / "single")[0])
    (ref,) = scan_folder(tmp_path / "multi")
    assert len(ref.files) == 1 and pydicom.dcmread(ref.files[0]).NumberOfFrames == 4
    multi = read_series(ref)
    assert np.array_equal(single.image, multi.image)
    assert np.allclose(single.affine, multi.affine) and multi.spacing == pytest.approx(single.spacing)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless])
def test_compressed_series(tmp_path: Path, syntax) -> None:
    img = _volume(d=3)
    write_dicom_series(img, (2, 1, 1), tmp_path, transfer_syntax=syntax)
    (ref,) = scan_folder(tmp_path)
    assert pydicom.dcmread(ref.files[0]).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(read_series(ref).image, img[::-1].astype(np.float32)) or np.array_equal(
        read_series(ref).image, img.astype(np.float32)
    )


def _series(tmp_path: Path, **kw) -> list[Path]:
    return write_dicom_series(_volume(d=kw.pop("d", 5)), kw.pop("spacing", (5.0, 1.0, 1.0)), tmp_path / "s", **kw)


def _read_error(tmp_path: Path) -> str:
    (ref,) = scan_folder(tmp_path / "s")
    with pytest.raises(DicomInputError) as err:
        read_series(ref)
    return str(err.value)


def test_missing_slice(tmp_path: Path) -> None:
    files = _series(tmp_path)
    files[2].unlink()
    assert "missing slices: 1 gap" in _read_error(tmp_path)


def test_duplicated_slice(tmp_path: Path) -> None:
    files = _series(tmp_path)
    ds = pydicom.dcmread(files[1])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(files[1].with_name("dup.dcm"))
    assert "duplicated slices" in _read_error(tmp_path)


def test_inconsistent_spacing(tmp_path: Path) -> None:
    files = _series(tmp_path)
    ds = pydicom.dcmread(files[-1])
    ds.ImagePositionPatient = [0.0, 0.0, 4 * 5.0 + 2.0]  # 7 mm after its neighbour, the others 5 mm
    ds.save_as(files[-1])
    assert "inconsistent slice spacing" in _read_error(tmp_path)


def test_inconsistent_orientation_and_pixel_spacing(tmp_path: Path) -> None:
    files = _series(tmp_path)
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = list(OBLIQUE)
    ds.save_as(files[3])
    assert "inconsistent orientation" in _read_error(tmp_path)
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.2, 1.0]
    ds.save_as(files[3])
    assert "inconsistent pixel spacing" in _read_error(tmp_path)


def test_mixed_series(tmp_path: Path) -> None:
    files = _series(tmp_path)
    other = write_dicom_series(_volume(d=1, h=8, w=8), (5, 1, 1), tmp_path / "other")
    ds = pydicom.dcmread(other[0])
    ds.SeriesInstanceUID = pydicom.dcmread(files[0]).SeriesInstanceUID
    ds.FrameOfReferenceUID = pydicom.dcmread(files[0]).FrameOfReferenceUID
    ds.save_as(tmp_path / "s" / "intruder.dcm")
    assert "mixed series: images of several matrix sizes" in _read_error(tmp_path)


def test_non_image_objects(tmp_path: Path) -> None:
    files = _series(tmp_path, d=1)
    for sop in ("1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.11.1"):  # Basic Text SR, GSPS
        ds = pydicom.dcmread(files[0])
        ds.SOPClassUID = sop
        ds.file_meta.MediaStorageSOPClassUID = sop
        for key in ("PixelData", "Rows", "Columns"):
            if key in ds:
                delattr(ds, key)
        ds.save_as(files[0])
        msg = _read_error(tmp_path)
        assert "not an image series" in msg and ("SR" in msg or "Presentation State" in msg)


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    files = _series(tmp_path, d=2)
    for p in files:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264: no decoder
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"
        ds.save_as(p)
    assert "unsupported transfer syntax 1.2.840.10008.1.2.4.102" in _read_error(tmp_path)


def test_oversized(tmp_path: Path) -> None:
    _series(tmp_path)
    (ref,) = scan_folder(tmp_path / "s")
    with pytest.raises(DicomInputError, match="oversized: 12x10x5 = 600 voxels"):
        read_series(ref, max_voxels=599)
    assert read_series(ref, max_voxels=600).image.shape == (5, 12, 10)


def test_cine_series_grouped_by_temporal_position(tmp_path: Path) -> None:
    cine = np.stack([_volume(d=3, seed=t) for t in range(4)])
    write_dicom_series(cine, (6.0, 1.0, 1.0), tmp_path)
    (ref,) = scan_folder(tmp_path)
    frames = read_series_frames(ref)
    assert len(frames) == 4 and all(f.image.shape == (3, 12, 10) for f in frames)
    for t, f in enumerate(frames):
        assert f.meta["dicom"].temporal_index == t
        assert np.array_equal(f.image, cine[t, ::-1].astype(np.float32)) or np.array_equal(f.image, cine[t].astype(np.float32))
    with pytest.raises(DicomInputError, match="cine series of 4 frames"):
        read_series(ref)


@pytest.mark.parametrize("enhanced", [False, True])
def test_seg_round_trip(tmp_path: Path, enhanced: bool) -> None:
    img = _volume(d=4)
    write_dicom_series(img, (3.0, 1.0, 1.25), tmp_path / "src", orientation=OBLIQUE, enhanced=enhanced)
    vol = read_series(scan_folder(tmp_path / "src")[0])
    label = np.zeros(img.shape, np.uint8)
    label[0, 2:6, 2:5] = 1
    label[2, 5:9, 3:7] = 3
    label[3, 1:3, 1:3] = 2
    names = {0: "background", 1: "RV", 2: "Myo", 3: "LV"}
    seg = build_seg(label, vol, names, [1, 2, 3], Algorithm("abc123", 7))
    path = tmp_path / "seg.dcm"
    path.write_bytes(seg_bytes(seg))
    back, seg_names = read_seg_labelmap(path, vol)
    assert np.array_equal(back, label)
    assert seg_names == {1: "RV", 2: "Myo", 3: "LV"}
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == vol.meta["dicom"].study_uid
    s1 = ds.SegmentSequence[0]
    assert s1.SegmentedPropertyTypeCodeSequence[0].CodeValue == "53085002"  # SNOMED CT right ventricle
    assert s1.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    algo = s1.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "VESSA" and "abc123" in algo.AlgorithmVersion and "bank 7" in algo.AlgorithmVersion
    referenced = {r.ReferencedSOPInstanceUID for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in vol.meta["dicom"].datasets}


def test_seg_subset_of_classes_and_unknown_names(tmp_path: Path) -> None:
    img = _volume(d=3)
    write_dicom_series(img, (3.0, 1.0, 1.0), tmp_path / "src")
    vol = read_series(scan_folder(tmp_path / "src")[0])
    label = np.zeros(img.shape, np.uint8)
    label[1, 3:6, 3:6] = 3
    label[0, 0:2, 0:2] = 1
    seg = build_seg(label, vol, {1: "tumour", 3: "LV"}, [1, 3], Algorithm("m", 1))
    path = tmp_path / "seg.dcm"
    path.write_bytes(seg_bytes(seg))
    back, names = read_seg_labelmap(path, vol)
    assert names == {1: "tumour", 2: "LV"}  # segments numbered 1..K in class order
    assert np.array_equal(back, np.where(label == 3, 2, label))
    ds = pydicom.dcmread(path)
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "99VESSA"


def test_nifti_and_seg_agree(tmp_path: Path) -> None:
    """The NIfTI label map and the SEG place the same voxels at the same world positions."""
    img = _volume(d=3)
    write_dicom_series(img, (3.0, 1.0, 1.5), tmp_path / "src", orientation=OBLIQUE)
    vol = read_series(scan_folder(tmp_path / "src")[0])
    label = np.zeros(img.shape, np.uint8)
    label[1, 4, 7] = 3
    nii = nib.Nifti1Image.from_bytes(label_to_nifti(label, vol).to_bytes())
    ijk = np.argwhere(np.asarray(nii.dataobj) == 3)[0]
    world_nii = _world(nii.affine, ijk) * np.array([-1, -1, 1])  # RAS → LPS
    seg = build_seg(label, vol, {3: "LV"}, [3], Algorithm("m", 1))
    ds = pydicom.dcmread(__import__("io").BytesIO(seg_bytes(seg)))
    (frame,) = ds.PerFrameFunctionalGroupsSequence
    pos = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
    row, col = np.argwhere(ds.pixel_array == 1)[0]
    ori = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    sp = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    world_seg = pos + col * sp[1] * ori[:3] + row * sp[0] * ori[3:]
    assert np.allclose(world_nii, world_seg, atol=1e-4)
    shutil.rmtree(tmp_path / "src")

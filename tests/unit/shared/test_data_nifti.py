"""NIfTI I/O: slice-first loading, label write-back in the input's frame, byte parsing and errors."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from shared.data.nifti import (
    label_to_nifti,
    label_to_nifti_bytes,
    load_label_nifti,
    load_nifti,
    nifti_from_bytes,
    nifti_to_bytes,
    save_label_nifti,
    through_plane_axes,
)

OBLIQUE = np.array(
    [
        [0.0, -1.5, 0.3, 12.5],
        [1.4, 0.0, 0.0, -20.0],
        [0.0, 0.2, 8.0, 5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _image(shape=(30, 40, 7), affine=OBLIQUE, dtype=np.float32, seed=0) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 1000).astype(dtype)
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = b"vessa test"
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    return img


def test_load_puts_through_plane_axis_first_and_keeps_frame():
    img = _image()
    zooms = img.header.get_zooms()
    vol = load_nifti(nifti_to_bytes(img))
    assert vol.image.shape == (7, 30, 40) and vol.image.dtype == np.float32
    assert vol.meta["axes"] == (2, 0, 1)
    assert vol.spacing == pytest.approx((zooms[2], zooms[0], zooms[1]))
    assert np.allclose(vol.affine, img.affine)
    assert np.array_equal(vol.image, np.asanyarray(img.dataobj).transpose(2, 0, 1))
    assert vol.header["descrip"] == b"vessa test"


@pytest.mark.parametrize(
    ("zooms", "axes"),
    [((8.0, 1.5, 1.5), (0, 1, 2)), ((1.5, 8.0, 1.2), (1, 0, 2)), ((1.2, 1.2, 1.2), (2, 0, 1))],
)
def test_through_plane_axis_choice(zooms, axes):
    assert through_plane_axes(zooms) == axes  # largest spacing first; ties go to the last axis
    img = nib.Nifti1Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.diag([*zooms, 1.0]))
    vol = load_nifti(img.to_bytes())
    assert vol.meta["axes"] == axes
    label = (vol.image > 10).astype(np.uint8)
    back = np.asanyarray(label_to_nifti(label, vol).dataobj)
    assert back.shape == (2, 3, 4)  # axes restored
    assert np.array_equal(back, (np.arange(24).reshape(2, 3, 4) > 10).astype(np.uint8))


def test_label_written_back_in_input_frame(tmp_path):
    img = _image()
    vol = load_nifti(nifti_to_bytes(img))
    label = np.zeros(vol.image.shape, np.int64)
    label[2:5, 10:20, 5:30] = 3
    label[0, 0, 0] = 1
    out = label_to_nifti(label, vol)
    assert out.get_data_dtype() == np.uint8
    assert np.allclose(out.affine, img.affine)
    assert out.header["qform_code"] == 1 and out.header["sform_code"] == 2
    assert out.header["descrip"] == b"vessa test"
    assert out.header.get_zooms() == pytest.approx(img.header.get_zooms())
    assert out.header.get_xyzt_units() == ("mm", "sec")
    data = np.asanyarray(out.dataobj)
    assert data.dtype == np.uint8 and np.array_equal(data, label.transpose(1, 2, 0))
    # through bytes (.nii.gz) and through a file (.nii and .nii.gz)
    parsed = nifti_from_bytes(label_to_nifti_bytes(label, vol))
    assert parsed.get_data_dtype() == np.uint8 and np.allclose(parsed.affine, img.affine)
    for name in ("pred.nii.gz", "pred.nii"):
        path = save_label_nifti(label, vol, tmp_path / name)
        loaded = nib.load(path)
        assert np.allclose(loaded.affine, img.affine)
        assert np.array_equal(np.asanyarray(loaded.dataobj), label.transpose(1, 2, 0))
        assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    # and the label reads back aligned with the image
    assert np.array_equal(load_label_nifti(tmp_path / "pred.nii.gz", axes=vol.meta["axes"]), label)


def test_label_rejects_bad_values():
    vol = load_nifti(_image().to_bytes())
    with pytest.raises(ValueError, match="shape"):
        label_to_nifti(np.zeros((1, 2, 3), np.uint8), vol)
    with pytest.raises(ValueError, match="0..255"):
        label_to_nifti(np.full(vol.image.shape, 300), vol)
    with pytest.raises(ValueError, match="integer"):
        label_to_nifti(np.full(vol.image.shape, 0.5), vol)


def test_nii_and_nii_gz_bytes():
    img = _image()
    raw = img.to_bytes()
    gz = gzip.compress(raw)
    a, b = load_nifti(raw), load_nifti(gz)
    assert np.array_equal(a.image, b.image)
    assert a.spacing == b.spacing
    assert isinstance(nifti_from_bytes(gz, "x.nii.gz"), nib.Nifti1Image)


def test_scaling_2d_and_singleton_4d():
    data = np.arange(12, dtype=np.int16).reshape(3, 4)
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 6.0, 1.0]))
    img.header.set_slope_inter(2.0, 1.0)
    vol = load_nifti(img.to_bytes())
    assert vol.image.shape == (1, 3, 4)
    assert np.allclose(vol.image[0], data * 2.0 + 1.0)  # scl_slope / scl_inter applied
    back = label_to_nifti((vol.image > 10).astype(np.uint8), vol)
    assert back.shape == (3, 4)  # written back as 2D, like the input
    four = nib.Nifti1Image(np.ones((5, 6, 3, 1), np.float32), np.eye(4))
    assert load_nifti(four.to_bytes()).image.shape == (3, 5, 6)


def test_normalize_option():
    vol = load_nifti(_image().to_bytes(), normalize=True)
    assert vol.image.min() == 0.0 and vol.image.max() == 1.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda raw: b"", "empty"),
        (lambda raw: b"definitely not a medical image" * 20, "not a NIfTI"),
        (lambda raw: raw[:100], "truncated|not a NIfTI"),
        (lambda raw: raw[:-200], "truncated"),
        (lambda raw: gzip.compress(raw)[:-50], "gzip"),
        (lambda raw: b"\x1f\x8b" + b"\x00" * 50, "gzip"),
        (lambda raw: raw[:344] + b"abcd" + raw[348:], "magic"),
        (
            lambda raw: nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)).to_bytes(),
            "dimensionality",
        ),
    ],
)
def test_bad_bytes_raise_value_error(make, message):
    raw = _image().to_bytes()
    with pytest.raises(ValueError, match=message):
        load_nifti(make(raw))


def test_nan_and_inf_rejected():
    for bad in (np.nan, np.inf):
        data = np.ones((4, 4, 3), np.float32)
        data[1, 1, 1] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            load_nifti(nib.Nifti1Image(data, np.eye(4)).to_bytes())


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load_nifti("/nonexistent/volume.nii.gz")

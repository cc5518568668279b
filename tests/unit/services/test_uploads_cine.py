"""A 4D cine upload (services/ingress/uploads.py): frames on the 4th axis, cut along the through-plane
axis frame by frame, and a (T, D, H, W) label stack written back as a 4D map in the input's geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from services.ingress.uploads import MAX_CINE_FRAMES, VolumeError, read_nifti_array, read_upload, write_like
from shared.wire.protocol import Limits


def _cine(t=3, shape=(20, 24, 4)) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 500, size=(*shape, t)).astype(np.int16)
    affine = np.diag([1.5, 1.5, 8.0, 1.0])
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms((1.5, 1.5, 8.0, 40.0))
    return img.to_bytes(), arr, affine


def test_cine_frames_and_4d_labels_back() -> None:
    data, arr, affine = _cine()
    with pytest.raises(VolumeError, match="4D NIfTI"):
        read_upload(data, "c.nii", None, Limits())  # a 3D-only caller still refuses it
    up = read_upload(data, "c.nii", None, Limits(), allow_cine=True)
    assert up.axis == 2 and up.frames.shape == (3, 4, 20, 24) and up.original_shape == arr.shape
    for t in range(3):
        assert np.array_equal(up.frames[t], np.moveaxis(arr[..., t], 2, 0).astype(np.float32))
    labels = (up.frames > 250).astype(np.uint8)  # any per-frame label stack
    out, out_affine, header = read_nifti_array(write_like(up, labels)[0])
    assert out.shape == arr.shape and np.allclose(out_affine, affine) and out.dtype == np.uint8
    assert np.array_equal(out, (arr > 250).astype(np.uint8))  # voxel (x, y, z, t) ↔ frames[t, z, x, y]
    assert header.get_zooms()[3] == pytest.approx(40.0)


def test_cine_limits() -> None:
    data, _, _ = _cine(t=MAX_CINE_FRAMES + 1, shape=(8, 8, 1))
    with pytest.raises(VolumeError, match=f"at most {MAX_CINE_FRAMES}"):
        read_upload(data, "c.nii", None, Limits(), allow_cine=True)
    arr = np.zeros((10, 10, 2, 2), np.float32)
    arr[0, 0, 0, 1] = np.nan
    with pytest.raises(VolumeError, match="frame 1"):
        read_upload(nib.Nifti1Image(arr, np.eye(4)).to_bytes(), "c.nii", None, Limits(), allow_cine=True)

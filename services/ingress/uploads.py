"""Uploaded arrays for the REST API: NIfTI volumes and `.npy` slice batches, in and back out.

A NIfTI volume is cut into 2D slices along its through-plane axis (the axis with the largest spacing,
or the one the caller names) and put back together afterwards; the label map written back keeps the
input's affine and header with an integer dtype. Everything is validated before it reaches the model.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from shared.wire.arrays import WireError, check_finite, read_npy
from shared.wire.protocol import Limits

#: frames of a 4D cine labeled in one request (ACDC's cines have 12-35)
MAX_CINE_FRAMES = 64


class VolumeError(ValueError):
    """An upload that is not a usable image; the message says why."""


@dataclass
class UploadedVolume:
    """kind: "nifti" or "npy"; slices: (D, H, W) with the through-plane axis first; channels:
    (D, C, H, W) for a 4D upload (student probabilities) else None; frames: (T, D, H, W) for a 4D cine
    (`allow_cine`: the 4th axis is time; `slices` is then frame 0); original_shape: the array's shape as
    uploaded; axis: the through-plane axis in the original array; gz: the upload was gzipped."""

    kind: str
    slices: np.ndarray
    original_shape: tuple[int, ...]
    axis: int
    image: nib.Nifti1Image | None = None
    gz: bool = False
    channels: np.ndarray | None = None
    frames: np.ndarray | None = None


def _gunzip(data: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise VolumeError(f"corrupt gzip data: {exc}") from None
    if len(out) > limit:
        raise VolumeError(f"decompressed upload is over the limit of {limit} bytes")
    if not d.eof:
        raise VolumeError("gzip data is truncated")
    return out


def load_nifti_bytes(data: bytes, limit: int) -> tuple[nib.Nifti1Image, bool]:
    """(image, was_gzipped); raises VolumeError for anything that is not a readable NIfTI-1/2."""
    gz = data[:2] == b"\x1f\x8b"
    raw = _gunzip(data, limit) if gz else data
    if len(raw) < 348:
        raise VolumeError(f"not a NIfTI file: {len(raw)} bytes is shorter than a NIfTI header")
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            img = klass.from_bytes(raw)
            break
        except Exception:
            img = None
    if img is None:
        raise VolumeError("not a NIfTI file (header not recognised)")
    shape = img.shape
    if any(int(s) < 0 for s in shape):
        raise VolumeError(f"NIfTI header has a negative dimension: shape {shape}")
    # Python ints: int64 arithmetic wraps around for the huge dims a lying NIfTI-2 header can hold.
    need = math.prod(int(s) for s in shape) * img.get_data_dtype().itemsize
    offset = int(img.header.get("vox_offset", 352))
    if len(raw) < offset + need:
        raise VolumeError(
            f"NIfTI data is truncated: header promises {need} bytes of voxels, file holds {max(0, len(raw) - offset)}"
        )
    return img, gz


def read_upload(
    data: bytes,
    filename: str,
    axis: int | None,
    limits: Limits,
    is_label: bool = False,
    allow_4d: bool = False,
    allow_cine: bool = False,
) -> UploadedVolume:
    """Parse an upload by content (magic bytes), not by its name. A 4D NIfTI is student probabilities
    with `allow_4d` (classes on the 4th axis), a cine with `allow_cine` (frames on it), else refused."""
    if not data:
        raise VolumeError("the uploaded file is empty")
    if data.startswith(b"\x93NUMPY"):
        return _from_npy(data, limits, is_label)
    if filename.lower().endswith(".npy"):
        raise VolumeError(f"{filename!r} is not a .npy file (magic string missing)")
    img, gz = load_nifti_bytes(data, limits.max_array_bytes)
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise VolumeError(f"cannot read NIfTI voxels: {exc}") from None
    if arr.dtype.kind not in "biuf":
        raise VolumeError(f"NIfTI voxel type {arr.dtype} is not supported")
    zooms = [float(z) for z in img.header.get_zooms()]
    channels = cine = None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim == 4:
        if allow_cine:
            cine = arr
        elif not allow_4d:
            raise VolumeError(f"expected a 2D or 3D image, got a 4D NIfTI of shape {arr.shape}")
        else:
            channels = arr
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[..., None]
        zooms = zooms[:2] + [1.0]
    if arr.ndim != 3:
        raise VolumeError(f"expected a 2D or 3D image, got {arr.ndim} dimensions (shape {arr.shape})")
    if axis is None:
        spatial = zooms[:3]
        axis = int(max(range(3), key=lambda i: (spatial[i], i)))  # ties: the last axis
    if axis not in (0, 1, 2):
        raise VolumeError(f"axis must be 0, 1 or 2, got {axis}")
    original_shape = tuple(int(s) for s in arr.shape)
    slices = _as_float32(np.moveaxis(arr, axis, 0), is_label)
    check_slices(slices, limits, is_label)
    if channels is not None:
        channels = np.moveaxis(np.moveaxis(channels, 3, 0), axis + 1, 0)  # (D, C, H, W)
        channels = np.ascontiguousarray(channels)
    frames = None
    if cine is not None:
        if cine.shape[3] > MAX_CINE_FRAMES:
            raise VolumeError(f"a cine of {cine.shape[3]} frames, at most {MAX_CINE_FRAMES} per request")
        frames = _as_float32(np.moveaxis(np.moveaxis(cine, 3, 0), axis + 1, 1), is_label)  # (T, D, H, W)
        for t, frame in enumerate(frames):
            try:
                check_slices(frame, limits, is_label)
            except VolumeError as exc:
                raise VolumeError(f"frame {t}: {exc}") from None
        frames = np.ascontiguousarray(frames, dtype=np.float32)
        original_shape = tuple(int(s) for s in cine.shape)
    slices = np.ascontiguousarray(slices, dtype=np.int64 if is_label else np.float32)
    return UploadedVolume("nifti", slices, original_shape, axis, img, gz, channels, frames)


def _from_npy(data: bytes, limits: Limits, is_label: bool) -> UploadedVolume:
    try:
        arr = read_npy(data, limits.max_array_bytes)
    except WireError as exc:
        raise VolumeError(str(exc)) from None
    original_shape = tuple(int(s) for s in arr.shape)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise VolumeError(f".npy slices must be (H, W) or (B, H, W), got shape {arr.shape}")
    if arr.dtype == np.bool_ and not is_label:
        raise VolumeError("a boolean array is not an image")
    arr = _as_float32(arr, is_label)
    check_slices(arr, limits, is_label)
    arr = np.ascontiguousarray(arr, dtype=np.int64 if is_label else np.float32)
    return UploadedVolume("npy", arr, original_shape, 0)


def _as_float32(slices: np.ndarray, is_label: bool) -> np.ndarray:
    """Images as the float32 they are served in, before the checks: a float64 value (or a NIfTI scaled
    by scl_slope) beyond float32's range becomes inf in the cast, so the finiteness check must see it."""
    if is_label or slices.dtype == np.float32 or slices.dtype.kind not in "fiu":
        return slices
    with np.errstate(over="ignore", invalid="ignore"):
        return slices.astype(np.float32)


def check_slices(slices: np.ndarray, limits: Limits, is_label: bool = False) -> None:
    """The per-request bounds (slice count, side, finite values; a label's range): VolumeError if not."""
    d, h, w = slices.shape
    if d == 0 or h == 0 or w == 0:
        raise VolumeError(f"the image is empty (shape {slices.shape})")
    if d > limits.max_slices:
        raise VolumeError(f"{d} slices, at most {limits.max_slices} per request")
    if not (limits.min_side <= h <= limits.max_side and limits.min_side <= w <= limits.max_side):
        raise VolumeError(f"slice size {h}×{w} outside [{limits.min_side}, {limits.max_side}]")
    try:
        check_finite(slices, "the image")
    except WireError as exc:
        raise VolumeError(str(exc)) from None
    if is_label:
        if slices.dtype.kind == "f" and not np.all(np.mod(slices, 1) == 0):
            raise VolumeError("a label map must hold integer class indices")
        if slices.min() < 0 or slices.max() > 255:
            raise VolumeError("label values must lie in [0, 255]")


def write_like(upload: UploadedVolume, labels: np.ndarray) -> tuple[bytes, str]:
    """labels: (D, H, W) uint8 in the upload's slice order → NIfTI bytes with the input's affine and
    header (uint8, no scaling), gzipped if the input was, and a file name."""
    if upload.frames is not None:  # a cine's labels (T, D, H, W) → the 4D (X, Y, Z, T) label map
        arr = np.moveaxis(np.moveaxis(labels.astype(np.uint8), 1, upload.axis + 1), 0, 3)
    else:
        arr = np.moveaxis(labels.astype(np.uint8), 0, upload.axis).reshape(upload.original_shape)
    header = upload.image.header.copy()
    header.set_data_dtype(np.uint8)
    out = type(upload.image)(arr, upload.image.affine, header)
    out.header.set_slope_inter(1.0, 0.0)
    raw = out.to_bytes()
    if upload.gz:
        return gzip.compress(raw, compresslevel=1), "labels.nii.gz"
    return raw, "labels.nii"


def nifti_bytes(array: np.ndarray, affine: np.ndarray | None = None, zooms=None, gz: bool = True) -> bytes:
    """A NIfTI file holding `array` (for clients and tests)."""
    img = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine)
    if zooms is not None:
        img.header.set_zooms(zooms)
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def read_nifti_array(data: bytes) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """(array, affine, header) of NIfTI bytes (for clients and tests)."""
    img, _ = load_nifti_bytes(data, 1 << 31)
    return np.asanyarray(img.dataobj), img.affine, img.header

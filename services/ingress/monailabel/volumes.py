"""Images and label maps of the MONAI Label dialect: NIfTI or NRRD in (bounded, checked), NIfTI or NRRD
out, always in the geometry of the image they belong to.

An image is read as a labeling job reads it (`shared.data.nifti.load_nifti`, min-max normalised per
volume, the through-plane axis first), so the facade's answer for a case is the job's answer. A label
map that comes back from a client must have the image's voxel grid; with Slicer's `label_info` (the
names of the segments it exported, in order) its values are mapped to VESSA's classes by name.
"""

from __future__ import annotations

import numpy as np

from services.ingress.uploads import VolumeError, load_nifti_bytes
from shared.data.nifti import (
    array_to_nifti_bytes,
    label_to_nifti,
    load_label_nifti,
    load_nifti,
    nifti_to_bytes,
    to_nifti_layout,
)
from shared.data.nrrd import NrrdError, is_nrrd, read_nrrd, write_nrrd
from shared.data.types import Volume
from shared.wire.protocol import Limits

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def _nifti_bytes(data: bytes, limits: Limits, what: str) -> bytes:
    """The upload as NIfTI bytes (a NRRD converted with its geometry), checked before any big allocation."""
    if not data:
        raise VolumeError(f"the {what} is empty")
    if is_nrrd(data):
        try:
            arr, affine = read_nrrd(data, limits.max_array_bytes)
        except NrrdError as exc:
            raise VolumeError(f"the {what}: {exc}") from None
        return array_to_nifti_bytes(arr, affine, arr.dtype, compress=False)
    try:
        load_nifti_bytes(data, limits.max_array_bytes)  # magic, truncation and gzip-bomb checks
    except VolumeError as exc:
        raise VolumeError(f"the {what} is neither NRRD nor NIfTI: {exc}") from None
    return data


def _check(vol: Volume, limits: Limits, what: str) -> Volume:
    d, h, w = vol.image.shape
    if min(d, h, w) == 0:
        raise VolumeError(f"the {what} is empty (shape {vol.image.shape})")
    if d > limits.max_slices:
        raise VolumeError(f"the {what} has {d} slices, at most {limits.max_slices} per request")
    if not (limits.min_side <= h <= limits.max_side and limits.min_side <= w <= limits.max_side):
        raise VolumeError(f"the {what}'s slices are {h}×{w}, outside [{limits.min_side}, {limits.max_side}]")
    return vol


def read_image(source, limits: Limits, image_id: str = "upload", what: str = "image") -> Volume:
    """A datastore file (path) or uploaded bytes as a slice-first Volume in [0, 1]."""
    if isinstance(source, bytes | bytearray):
        source = _nifti_bytes(bytes(source), limits, what)
    try:
        vol = load_nifti(source, case_id=image_id, normalize=True)
    except (ValueError, OSError) as exc:
        raise VolumeError(f"cannot read the {what}: {exc}") from None
    return _check(vol, limits, what)


def nifti_shape(like: Volume) -> tuple[int, ...]:
    """The image's voxel grid as stored (x, y, z), a trailing single volume dropped."""
    shape = tuple(like.meta.get("nifti_shape") or ())
    return shape[:3] if len(shape) == 4 else shape


def read_label(
    data: bytes,
    like: Volume,
    limits: Limits,
    class_ids: list[int],
    names: dict[str, int],
    label_info: list | None = None,
) -> np.ndarray:
    """An uploaded label map of `like` as (D, H, W) uint8 VESSA class indices.

    class_ids: VESSA's foreground classes; names: class name → index. With `label_info` (Slicer's
    `[{"name": "LV", ...}, …]`, value k = the k-th entry) values are mapped by name; without it they
    must already be class indices. Raises VolumeError naming what is wrong."""
    raw = _nifti_bytes(data, limits, "label file")
    img, _ = load_nifti_bytes(raw, limits.max_array_bytes)
    shape = tuple(int(s) for s in img.shape)
    shape = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
    want = nifti_shape(like)
    if shape != want:
        raise VolumeError(f"the label map's voxel grid {list(shape)} differs from the image's {list(want)}")
    try:
        lab = load_label_nifti(raw, tuple(like.meta["axes"]))
    except ValueError as exc:
        raise VolumeError(f"the label file: {exc}") from None
    found = {int(v) for v in np.unique(lab)} - {0}
    if label_info:
        lut = np.zeros(256, np.uint8)
        for k, entry in enumerate(label_info, start=1):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                raise VolumeError('label_info must be a list of {"name": ...} in the order of the label values')
            if name.lower() not in names:
                if k in found:
                    raise VolumeError(f"segment {name!r} is not a class of this model ({sorted(names)})")
                continue
            if k < 256:
                lut[k] = names[name.lower()]
        beyond = sorted(v for v in found if v > len(label_info))
        if beyond:
            raise VolumeError(f"label values {beyond} have no entry in label_info ({len(label_info)} segments)")
        return lut[lab]
    unknown = sorted(found - set(class_ids))
    if unknown:
        raise VolumeError(f"label values {unknown} are not classes of this model (classes {sorted(class_ids)})")
    return lab


def encode_label(labels: np.ndarray, like: Volume, extension: str) -> bytes:
    """labels (D, H, W) as a uint8 file in `like`'s geometry: `.nii.gz`, `.nii` or `.nrrd`."""
    if extension == ".nrrd":
        img = label_to_nifti(labels, like)  # the affine the NIfTI answer would carry
        return write_nrrd(np.asarray(to_nifti_layout(labels.astype(np.uint8), like)).reshape(nifti_shape(like)), img.affine)
    return nifti_to_bytes(label_to_nifti(labels, like), compress=extension == ".nii.gz")

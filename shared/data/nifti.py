"""NIfTI input and output with slices along axis 0, and label maps written back in the input's frame.

`load_nifti` puts the through-plane axis (the one with the largest voxel spacing; ties go to the
last axis, NIfTI's usual slice axis) first, and remembers the permutation in `Volume.meta["axes"]`
so `label_to_nifti` can undo it: a label map written back has the input's affine, header (qform and
sform codes, units, description), voxel grid and an unsigned 8-bit dtype.

Every problem with the bytes (not NIfTI, truncated, 4D, NaN/inf, bad gzip) raises `ValueError` with a
message naming the problem, never a nibabel internal exception, so a server can return it as-is.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from shared.data.types import Volume

_GZIP_MAGIC = b"\x1f\x8b"
_N1_MAGIC = (b"n+1\x00",)
_N1_PAIR_MAGIC = b"ni1\x00"
_N2_MAGIC = b"n+2\x00\r\n\x1a\n"


def _sizeof_hdr(data: bytes) -> int | None:
    """The header size field read in both byte orders (348 for NIfTI-1, 540 for NIfTI-2), or None."""
    if len(data) < 4:
        return None
    for fmt in ("<i", ">i"):
        (value,) = struct.unpack(fmt, data[:4])
        if value in (348, 540):
            return value
    return None


def nifti_from_bytes(data: bytes, filename_hint: str | None = None, allow_4d: bool = False) -> nib.Nifti1Image:
    """Parse `.nii` or gzipped `.nii.gz` bytes (gzip detected by its magic) into a nibabel image.

    Checks the NIfTI magic, that the file holds all the voxel data its header promises, and that the
    data is 2D, 3D, or 4D with a single volume. Returns a Nifti1Image (or Nifti2Image for NIfTI-2).
    Raises ValueError with a clear message otherwise.
    """
    where = f" ({filename_hint})" if filename_hint else ""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"expected NIfTI bytes{where}, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ValueError(f"empty input{where}: no NIfTI data")
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"corrupt or truncated gzip stream{where}: {exc}") from None
    size = _sizeof_hdr(data)
    if size is None:
        raise ValueError(f"not a NIfTI file{where}: the header does not start with sizeof_hdr 348 or 540")
    if len(data) < size:
        raise ValueError(f"truncated NIfTI{where}: {len(data)} bytes, shorter than the {size}-byte header")
    if size == 348:
        magic = data[344:348]
        if magic == _N1_PAIR_MAGIC:
            raise ValueError(
                f"NIfTI header-only file (.hdr/.img pair){where} is not supported; send a single .nii/.nii.gz"
            )
        if magic not in _N1_MAGIC:
            raise ValueError(f"not a NIfTI file{where}: bad magic {magic!r}")
        klass = nib.Nifti1Image
    else:
        if data[4:12] != _N2_MAGIC:
            raise ValueError(f"not a NIfTI file{where}: bad NIfTI-2 magic {data[4:12]!r}")
        klass = nib.Nifti2Image
    try:
        img = klass.from_bytes(data)
    except Exception as exc:  # nibabel raises many types for malformed headers
        raise ValueError(f"invalid NIfTI header{where}: {exc}") from None
    hdr = img.header
    shape = tuple(int(s) for s in img.shape)
    if any(s <= 0 for s in shape):
        raise ValueError(f"invalid NIfTI{where}: empty dimension in shape {shape}")
    if not (allow_4d and len(shape) == 4):  # a cine (shared/data/cine.py) reads 4D on purpose
        _check_dims(shape, where)
    itemsize = np.dtype(hdr.get_data_dtype()).itemsize
    # The image's header copy has vox_offset reset; the array proxy keeps the file's offset.
    offset = int(getattr(img.dataobj, "offset", hdr.get_data_offset()))
    needed = offset + math.prod(shape) * itemsize  # Python ints: int64 wraps for lying NIfTI-2 dims
    if len(data) < needed:
        raise ValueError(
            f"truncated NIfTI{where}: {len(data)} bytes, the header needs {needed} for shape {shape}"
        )
    return img


def _check_dims(shape: tuple[int, ...], where: str) -> None:
    if len(shape) in (2, 3):
        return
    if len(shape) == 4 and shape[3] == 1:
        return
    raise ValueError(
        f"unsupported NIfTI dimensionality{where}: shape {shape}; expected a 2D or 3D image "
        "(4D only with a single volume)"
    )


def _read_source(src: str | Path | bytes) -> tuple[nib.Nifti1Image, str]:
    if isinstance(src, bytes | bytearray | memoryview):
        return nifti_from_bytes(bytes(src)), "<bytes>"
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    # Reading the bytes ourselves gives the same validation for files and uploads.
    return nifti_from_bytes(path.read_bytes(), filename_hint=path.name), path.name


def _as_3d(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim == 4:
        return arr[..., 0]
    return arr


def through_plane_axes(zooms: tuple[float, float, float]) -> tuple[int, int, int]:
    """Axis permutation putting the axis with the largest spacing first (ties: the last such axis)."""
    z = np.asarray(zooms, dtype=np.float64)
    axis = int(2 - np.argmax(z[::-1]))  # argmax of the reversed array prefers later axes on ties
    rest = [a for a in range(3) if a != axis]
    return (axis, rest[0], rest[1])


def _zooms3(header) -> tuple[float, float, float]:
    zooms = tuple(float(z) for z in (tuple(header.get_zooms()) + (1.0, 1.0, 1.0))[:3])
    return tuple(z if z > 0 else 1.0 for z in zooms)  # type: ignore[return-value]


def nifti_geometry(path: str | Path) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Slice-first shape (D, H, W) and spacing (z, y, x) of a NIfTI file from its header alone."""
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise ValueError(f"cannot read NIfTI header ({Path(path).name}): {exc}") from None
    shape = tuple(int(s) for s in img.shape)
    _check_dims(shape, f" ({Path(path).name})")
    shape3 = (shape + (1,))[:3] if len(shape) == 2 else shape[:3]
    zooms = _zooms3(img.header)
    axes = _axes_of(img)
    return tuple(shape3[a] for a in axes), tuple(zooms[a] for a in axes)  # type: ignore[return-value]


def _axes_of(img) -> tuple[int, int, int]:
    # A 2D image is one slice: its added third axis is the through-plane axis, whatever the zooms say.
    return (2, 0, 1) if len(img.shape) == 2 else through_plane_axes(_zooms3(img.header))


def _data(img: nib.Nifti1Image, where: str) -> np.ndarray:
    try:
        arr = np.asanyarray(img.dataobj)  # applies scl_slope / scl_inter
    except Exception as exc:
        raise ValueError(f"cannot read NIfTI voxel data{where}: {exc}") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"unsupported NIfTI data type {arr.dtype}{where}")
    return arr


def load_nifti(src: str | Path | bytes, case_id: str | None = None, normalize: bool = False) -> Volume:
    """Load a NIfTI image (path, `.nii` bytes or `.nii.gz` bytes) as a slice-first Volume.

    Returns image (D, H, W) float32 (raw intensities, or min-max normalised to [0, 1] with
    `normalize=True`), spacing (z, y, x) mm in that order, the file's affine and a copy of its header.
    `meta["axes"]` is the permutation applied to the (x, y, z) NIfTI array, `meta["nifti_shape"]` its
    original shape. Raises ValueError for NaN/inf voxels or anything `nifti_from_bytes` rejects.
    """
    img, name = _read_source(src)
    where = f" ({name})"
    raw = _data(img, where)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise ValueError(f"NIfTI image{where} contains NaN or infinite values")
    arr3 = _as_3d(raw)
    zooms3 = _zooms3(img.header)
    axes = _axes_of(img)
    image = np.ascontiguousarray(np.transpose(arr3, axes), dtype=np.float32)
    if normalize:
        image = normalize_minmax(image)
    if case_id is None:
        case_id = _strip_nifti_suffix(name) if name != "<bytes>" else "volume"
    return Volume(
        case_id=case_id,
        image=image,
        spacing=tuple(zooms3[a] for a in axes),  # type: ignore[arg-type]
        affine=np.asarray(img.affine, dtype=np.float64),
        header=img.header.copy(),
        meta={"axes": axes, "nifti_shape": tuple(int(s) for s in img.shape), "source": name},
    )


def label_values(raw: np.ndarray, what: str) -> np.ndarray:
    """A label map's values as integers 0..255 (floats within 1e-3 of an integer are rounded); ValueError
    naming `what` for NaN/inf, non-integer or out-of-range values."""
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise ValueError(f"{what} contains NaN or infinite values")
        rounded = np.rint(raw)
        if np.abs(raw - rounded).max(initial=0.0) > 1e-3:
            raise ValueError(f"{what} holds non-integer values")
        raw = rounded
    if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise ValueError(f"{what} has values outside 0..255")
    return raw


def load_label_nifti(src: str | Path | bytes, axes: tuple[int, int, int] | None = None) -> np.ndarray:
    """Load a label map as (D, H, W) uint8, permuted by `axes` (pass the image's `meta["axes"]` so
    image and label line up; default: the label file's own through-plane order).

    Raises ValueError for non-integer or out-of-range (0..255) values."""
    img, name = _read_source(src)
    where = f" ({name})"
    raw = label_values(_as_3d(_data(img, where)), f"label map{where}")
    if axes is None:
        axes = _axes_of(img)
    return np.ascontiguousarray(np.transpose(raw, axes)).astype(np.uint8)


def normalize_minmax(image: np.ndarray) -> np.ndarray:
    """Min-max normalise a volume to [0, 1] float32 (a constant volume becomes all zeros)."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float32)
    return ((img - lo) / (hi - lo)).astype(np.float32)


def _strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _default_axes(like: Volume) -> tuple[int, int, int]:
    axes = like.meta.get("axes") if like.meta else None
    # A volume that never was NIfTI (e.g. HDF5) is written with slices on the last NIfTI axis.
    return tuple(axes) if axes is not None else (2, 0, 1)  # type: ignore[return-value]


def to_nifti_layout(array_dhw: np.ndarray, like: Volume) -> np.ndarray:
    """Undo `load_nifti`'s permutation: (D, H, W) -> the NIfTI array layout (and shape) of `like`."""
    axes = _default_axes(like)
    arr = np.transpose(array_dhw, np.argsort(axes))
    shape = like.meta.get("nifti_shape") if like.meta else None
    if shape is not None and int(np.prod(shape)) == arr.size:
        arr = arr.reshape(shape)  # back to 2D or 4D-singleton when the input was
    return arr


def label_to_nifti(label_dhw: np.ndarray, like: Volume) -> nib.Nifti1Image:
    """A label map (D, H, W), integer valued 0..255, as a NIfTI image in the frame of `like`.

    Keeps `like`'s affine and header (qform/sform codes, units, description); sets the data type to
    uint8 with no intensity scaling. Without a header (a volume from HDF5), the affine is built from
    `like.spacing`.
    """
    label = np.asarray(label_dhw)
    if label.shape != like.image.shape:
        raise ValueError(f"label shape {label.shape} differs from the image shape {like.image.shape}")
    if label.dtype.kind == "f":
        if not np.isfinite(label).all() or np.abs(label - np.rint(label)).max(initial=0) > 1e-3:
            raise ValueError("label map must hold integer class indices")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError("label values must lie in 0..255 to be written as uint8")
    data = np.ascontiguousarray(to_nifti_layout(np.rint(label).astype(np.uint8), like))
    header = like.header
    if header is not None:
        klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        header = header.copy()
    else:
        klass = nib.Nifti1Image
    affine = like.affine
    if affine is None:
        spacing = like.spacing or (1.0, 1.0, 1.0)
        zooms = np.ones(3)
        for i, axis in enumerate(_default_axes(like)):
            zooms[axis] = spacing[i]
        affine = np.diag([*zooms, 1.0])
    img = klass(data, affine, header=header)
    hdr = img.header
    hdr.set_data_dtype(np.uint8)
    hdr["scl_slope"] = 1.0  # labels are stored verbatim, never rescaled
    hdr["scl_inter"] = 0.0
    hdr["cal_min"] = 0
    hdr["cal_max"] = float(data.max(initial=0))
    if like.header is not None:
        # nibabel re-derives the codes from the affine; keep the input's so viewers place it identically.
        src = like.header
        img.set_qform(affine, code=int(src["qform_code"]))
        img.set_sform(affine, code=int(src["sform_code"]))
    return img


def probs_to_nifti(probs_dchw: np.ndarray, like: Volume) -> nib.Nifti1Image:
    """Per-class probabilities (D, C, H, W) uint8 (p·255) as a 4D NIfTI in the frame of `like`: the
    three spatial axes exactly as the label map's (same affine, qform/sform), classes on the 4th axis,
    background first. Stored verbatim as uint8 (scl_slope 1/255 would make viewers show p itself, but
    many tools ignore it; the documented unit is p·255)."""
    probs = np.asarray(probs_dchw)
    if probs.ndim != 4 or probs.shape[:1] + probs.shape[2:] != like.image.shape:
        raise ValueError(f"probabilities {probs.shape} do not match the image {like.image.shape} as (D, C, H, W)")
    if probs.dtype != np.uint8:
        raise ValueError(f"probabilities must be uint8 (p·255), got {probs.dtype}")
    channels = []
    for c in range(probs.shape[1]):
        arr = to_nifti_layout(probs[:, c], like)
        arr = arr.reshape(arr.shape[:3]) if arr.ndim > 3 else arr.reshape(arr.shape + (1,) * (3 - arr.ndim))
        channels.append(arr)
    ref = label_to_nifti(np.zeros(like.image.shape, np.uint8), like)  # the label map's geometry and codes
    img = type(ref)(np.ascontiguousarray(np.stack(channels, axis=-1)), ref.affine, header=ref.header.copy())
    img.header.set_data_dtype(np.uint8)
    img.header["cal_min"], img.header["cal_max"] = 0, 255
    img.header["intent_name"] = b"vessa probs x255"
    img.set_qform(ref.affine, code=int(ref.header["qform_code"]))
    img.set_sform(ref.affine, code=int(ref.header["sform_code"]))
    return img


def nifti_to_bytes(img: nib.Nifti1Image, compress: bool = True) -> bytes:
    """Serialise a NIfTI image as `.nii.gz` (default; gzip mtime 0, so output is deterministic) or `.nii`."""
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def label_to_nifti_bytes(label_dhw: np.ndarray, like: Volume, compress: bool = True) -> bytes:
    """`label_to_nifti` serialised (`.nii.gz` bytes by default)."""
    return nifti_to_bytes(label_to_nifti(label_dhw, like), compress=compress)


def save_label_nifti(label_dhw: np.ndarray, like: Volume, path: str | Path) -> Path:
    """Write a label map next to its image's frame; `.nii.gz` paths are gzipped, `.nii` are not."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(label_to_nifti_bytes(label_dhw, like, compress=out.name.endswith(".gz")))
    return out


def array_to_nifti_bytes(
    array_xyz: np.ndarray,
    affine: np.ndarray,
    dtype: np.dtype | type,
    compress: bool = True,
    descrip: str = "",
) -> bytes:
    """A new NIfTI-1 file (bytes) from an array already in NIfTI (x, y, z) order. qform = sform = affine,
    units mm and s."""
    data = np.ascontiguousarray(array_xyz).astype(dtype)
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if descrip:
        img.header["descrip"] = descrip.encode()[:79]
    return nifti_to_bytes(img, compress=compress)

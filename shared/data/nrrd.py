"""NRRD files (the format 3D Slicer saves label maps in): a bounded reader and a writer, no dependency.

Only what volumes and label maps use: a 2D/3D (or 4D with a trailing single channel) array, raw or
gzip encoding, little or big endian, `space directions` + `space origin` in a named 3D space (LPS, RAS,
LAS) or plain `spacings`. The affine comes back in NIfTI's RAS convention, so a NRRD and the NIfTI it
was saved from give the same affine. Detached data (`data file:`), ascii/bzip2 encodings and skips are
refused with a message, as is anything whose header and data disagree.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib

import numpy as np

MAGIC = b"NRRD000"

_TYPES: dict[str, str] = {}
for _names, _dtype in (
    (("signed char", "int8", "int8_t"), "i1"),
    (("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    (("int", "signed int", "int32", "int32_t"), "i4"),
    (("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"), "i8"),
    (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    (("float",), "f4"),
    (("double",), "f8"),
):
    for _n in _names:
        _TYPES[_n] = _dtype
_WRITE_TYPES = {"u1": "unsigned char", "i1": "signed char", "u2": "unsigned short", "i2": "short", "u4": "unsigned int", "i4": "int", "f4": "float", "f8": "double"}
# sign flips that take a space's coordinates to RAS (x, y, z)
_SPACES = {
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
    "scanner-xyz": (1, 1, 1),
    "3d-right-handed": (1, 1, 1),
}


class NrrdError(ValueError):
    """Not a NRRD this reader takes; the message says why."""


def is_nrrd(data: bytes) -> bool:
    return data[:7] == MAGIC


def _vector(text: str, where: str) -> list[float] | None:
    text = text.strip()
    if text == "none":
        return None
    m = re.fullmatch(r"\(([^)]*)\)", text)
    if not m:
        raise NrrdError(f"NRRD {where}: expected a vector like (1,0,0), got {text!r}")
    try:
        vals = [float(v) for v in m.group(1).split(",")]
    except ValueError:
        raise NrrdError(f"NRRD {where}: {text!r} holds a non-number") from None
    if not all(math.isfinite(v) for v in vals):
        raise NrrdError(f"NRRD {where}: {text!r} is not finite")
    return vals


def _header(data: bytes, limit: int = 1 << 16) -> tuple[dict[str, str], int]:
    """Fields (lower-case keys) and the offset of the data."""
    if not is_nrrd(data):
        raise NrrdError("not a NRRD file (no NRRD000x magic)")
    end = data.find(b"\n\n", 0, limit)
    if end < 0:
        end = data.find(b"\r\n\r\n", 0, limit)
        if end < 0:
            raise NrrdError("NRRD header has no end (a blank line) within the first 64 KB")
        offset = end + 4
    else:
        offset = end + 2
    try:
        lines = data[:end].decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise NrrdError("NRRD header is not ASCII text") from None
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if not line or line.startswith("#") or ":=" in line.split(": ", 1)[0]:
            continue  # comments and key/value pairs carry nothing we use
        if ": " not in line:
            raise NrrdError(f"NRRD header line {line[:60]!r} is not 'field: value'")
        key, value = line.split(": ", 1)
        fields[key.strip().lower()] = value.strip()
    return fields, offset


def read_nrrd(data: bytes, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(array in NRRD axis order, i.e. NIfTI's (x, y, z), and its 4×4 RAS affine). `max_bytes` bounds
    the decoded voxels (a gzip bomb or a header that promises too much is refused before allocating)."""
    fields, offset = _header(data)
    if "data file" in fields or "datafile" in fields:
        raise NrrdError("detached NRRD data (a 'data file' field) is not accepted: send one .nrrd file")
    for key in ("line skip", "lineskip", "byte skip", "byteskip"):
        if fields.get(key, "0") not in ("0",):
            raise NrrdError(f"NRRD field '{key}' is not supported")
    dtype_name = fields.get("type", "").lower()
    if dtype_name not in _TYPES:
        raise NrrdError(f"NRRD type {fields.get('type')!r} is not supported")
    dtype = np.dtype(_TYPES[dtype_name])
    try:
        dim = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
    except (KeyError, ValueError):
        raise NrrdError("NRRD header needs integer 'dimension' and 'sizes' fields") from None
    if len(sizes) != dim or dim not in (2, 3, 4) or any(s <= 0 for s in sizes):
        raise NrrdError(f"NRRD sizes {sizes} do not describe a 2D or 3D image")
    if dim == 4 and sizes[0] != 1 and sizes[3] != 1:
        raise NrrdError(f"a 4D NRRD of sizes {sizes} (several channels or segments) is not a label map VESSA reads")
    if dtype.itemsize > 1:
        endian = fields.get("endian", "little").lower()
        if endian not in ("little", "big"):
            raise NrrdError(f"NRRD endian {endian!r} is neither little nor big")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    need = math.prod(sizes) * dtype.itemsize  # Python ints: no wrap-around for lying sizes
    if need > max_bytes:
        raise NrrdError(f"the NRRD's voxels ({need} bytes) are over the limit of {max_bytes} bytes")
    encoding = fields.get("encoding", "").lower()
    payload = data[offset:]
    if encoding in ("gzip", "gz"):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            payload = d.decompress(payload, need + 1)
        except zlib.error as exc:
            raise NrrdError(f"corrupt gzip data in the NRRD: {exc}") from None
    elif encoding != "raw":
        raise NrrdError(f"NRRD encoding {encoding!r} is not supported (raw or gzip)")
    if len(payload) < need:
        raise NrrdError(f"NRRD data is truncated: the header promises {need} bytes, the file holds {len(payload)}")
    arr = np.frombuffer(payload[:need], dtype=dtype).reshape(sizes, order="F")
    axes = list(range(dim))
    if dim == 4:  # a trailing (or leading, as Slicer writes a list axis first) single channel
        arr = arr[..., 0] if sizes[3] == 1 else arr[0]
        axes = axes[:3] if sizes[3] == 1 else axes[1:]
    return np.asarray(arr, dtype=dtype.newbyteorder("=")), _affine(fields, len(axes), axes)


def _affine(fields: dict[str, str], ndim: int, axes: list[int]) -> np.ndarray:
    affine = np.eye(4)
    space = fields.get("space", "").lower()
    if "space directions" in fields:
        flips = np.array(_SPACES.get(space, (1, 1, 1)), dtype=np.float64)
        if space and space not in _SPACES:
            raise NrrdError(f"NRRD space {fields['space']!r} is not supported")
        raw = re.findall(r"\([^)]*\)|none", fields["space directions"])
        vectors = [_vector(v, "space directions") for v in raw]
        spatial = [vectors[a] if a < len(vectors) else None for a in axes]
        for i, v in enumerate(spatial[:3]):
            if v is None or len(v) != 3:
                raise NrrdError("NRRD space directions must give a 3-vector for every spatial axis")
            affine[:3, i] = np.array(v) * flips
        if "space origin" in fields:
            origin = _vector(fields["space origin"], "space origin")
            if origin is None or len(origin) != 3:
                raise NrrdError("NRRD space origin must be a 3-vector")
            affine[:3, 3] = np.array(origin) * flips
    elif "spacings" in fields:
        try:
            sp = [float(s) for s in fields["spacings"].split()]
        except ValueError:
            raise NrrdError("NRRD spacings must be numbers") from None
        for i, a in enumerate(axes[:3]):
            if a < len(sp) and math.isfinite(sp[a]) and sp[a] > 0:
                affine[i, i] = sp[a]
    if ndim == 2:
        affine[2, 2] = 1.0
    return affine


def write_nrrd(array: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    """A NRRD (LPS space, as Slicer writes) of a 3D array in NIfTI axis order with a RAS affine."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"write_nrrd takes a 2D or 3D array, got shape {arr.shape}")
    kind = arr.dtype.str[1:]
    if kind not in _WRITE_TYPES:
        raise ValueError(f"NRRD output of dtype {arr.dtype} is not supported")
    flips = np.array(_SPACES["lps"], dtype=np.float64)
    a = np.asarray(affine, dtype=np.float64)

    def vec(v) -> str:
        return "(" + ",".join(repr(float(x)) for x in v) + ")"

    header = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_WRITE_TYPES[kind]}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(s) for s in arr.shape),
        "space directions: " + " ".join(vec(a[:3, i] * flips) for i in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        f"encoding: {'gzip' if compress else 'raw'}",
        "space origin: " + vec(a[:3, 3] * flips),
    ]
    body = np.asarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes(order="F")
    if compress:
        body = gzip.compress(body, compresslevel=1)
    return ("\n".join(header) + "\n\n").encode("ascii") + body

"""Arrays on the wire: raw bytes + dtype + shape (+ optional zlib), and the `.npy` reader.

Nothing here unpickles: dtypes come from an allow-list, shapes are checked against the byte count
before any array is built, decompression is bounded (no zip bombs), and `.npy` is read with
`allow_pickle=False`. Every decoder raises `WireError` with a message that names the problem, which
the REST layer turns into a 4xx and the dispatcher into an error result.
"""

from __future__ import annotations

import io
import math
import zlib
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

ALLOWED_DTYPES = (
    "bool",
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
)
MAX_NDIM = 4
DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # one array, decoded
COMPRESS_MIN_BYTES = 16 * 1024  # below this, compression is not worth the time


class WireError(ValueError):
    """Malformed wire data; the message says what is wrong."""


class ArraySpec(BaseModel):
    """How one array travels. `blob` indexes the message's list of binary parts."""

    model_config = ConfigDict(extra="forbid")

    dtype: str
    shape: tuple[int, ...] = Field(max_length=MAX_NDIM)
    codec: Literal["raw", "zlib"] = "raw"
    blob: int = Field(ge=0, le=100_000)

    @field_validator("dtype")
    @classmethod
    def _dtype_allowed(cls, v: str) -> str:
        if v not in ALLOWED_DTYPES:
            raise ValueError(f"dtype {v!r} not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
        return v

    @field_validator("shape")
    @classmethod
    def _shape_sane(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 or d > 1 << 24 for d in v):
            raise ValueError(f"shape {v} has a negative or absurd dimension")
        return v

    def nbytes(self) -> int:
        # Python ints: np.prod in int64 wraps around for huge shapes (2^24 ^ 4 → 0), which would let a
        # lying spec past the size checks.
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def encode_array(arr: np.ndarray, blobs: list[bytes], compress: bool | None = None) -> ArraySpec:
    """Append `arr`'s bytes to `blobs` and return its spec. compress=None: zlib above 16 KiB when it
    saves at least a quarter (label maps and probabilities compress well, noisy images do not)."""
    arr = np.asarray(arr, order="C")  # not ascontiguousarray: that turns a 0-d array into 1-d
    if arr.dtype.name not in ALLOWED_DTYPES:
        raise WireError(f"cannot send dtype {arr.dtype}")
    if not arr.dtype.isnative:
        # The wire carries native byte order: a big-endian array's bytes under the same dtype name
        # would be read back as garbage.
        arr = arr.astype(arr.dtype.newbyteorder("="))
    raw = arr.tobytes()
    codec = "raw"
    data = raw
    if compress or (compress is None and len(raw) >= COMPRESS_MIN_BYTES):
        packed = zlib.compress(raw, 1)
        if compress or len(packed) < 0.75 * len(raw):
            codec, data = "zlib", packed
    blobs.append(data)
    return ArraySpec(dtype=arr.dtype.name, shape=tuple(arr.shape), codec=codec, blob=len(blobs) - 1)


def decode_array(spec: ArraySpec, blobs: list[bytes], max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """The array `spec` describes, read-only, without copying raw payloads."""
    if spec.blob >= len(blobs):
        raise WireError(f"array refers to binary part {spec.blob}, but the message has {len(blobs)}")
    expected = spec.nbytes()
    if expected > max_bytes:
        raise WireError(
            f"array of shape {spec.shape} and dtype {spec.dtype} is {expected} bytes, over the limit {max_bytes}"
        )
    data = blobs[spec.blob]
    if spec.codec == "zlib":
        try:
            d = zlib.decompressobj()
            data = d.decompress(data, expected + 1)  # bounded: never inflate past what the shape says
        except zlib.error as exc:
            raise WireError(f"binary part {spec.blob} is not valid zlib data: {exc}") from None
        if len(data) == expected and not d.eof:  # complete payload, checksum cut off: truncated
            raise WireError(f"binary part {spec.blob} is truncated zlib data (stream not finished)")
    if len(data) != expected:
        raise WireError(
            f"binary part {spec.blob} holds {len(data)} bytes, but shape {spec.shape} of {spec.dtype} needs {expected}"
        )
    return np.frombuffer(data, dtype=np.dtype(spec.dtype)).reshape(spec.shape)


def read_npy(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """A `.npy` file's array, never unpickling; object arrays and bad headers raise WireError."""
    if not data.startswith(b"\x93NUMPY"):
        raise WireError("not a .npy file (magic string missing)")
    bio = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(bio)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise WireError(f".npy format version {version} not supported (1.0 and 2.0 are)")
        shape, fortran, dtype = readers[version](bio)  # the header only: no data, no pickle
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"malformed .npy header: {exc}") from None
    if dtype.hasobject or dtype.name not in ALLOWED_DTYPES:
        raise WireError(f".npy dtype {dtype} not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
    if len(shape) > MAX_NDIM:
        raise WireError(f".npy array has {len(shape)} dimensions, at most {MAX_NDIM} allowed")
    if any(d < 0 for d in shape):
        raise WireError(f".npy array has a negative dimension: shape {shape}")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no int64 wrap-around
    if expected > max_bytes:
        raise WireError(f".npy array of shape {shape} is {expected} bytes, over the limit {max_bytes}")
    if len(data) - bio.tell() < expected:
        raise WireError(
            f".npy data is truncated: {len(data) - bio.tell()} bytes for shape {shape} of {dtype}"
        )
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise WireError(f"cannot read .npy: {exc}") from None
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def write_npy(arr: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, np.asarray(arr, order="C"), allow_pickle=False)
    return bio.getvalue()


def check_finite(arr: np.ndarray, what: str) -> None:
    """Raise WireError when a float array holds NaN or inf."""
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise WireError(f"{what} contains NaN or inf values")

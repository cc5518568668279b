"""The assistant call: what a REST ingress or the Redis dispatcher sends to an assistant replica.

A call is a JSON-able `AssistCall` plus a list of binary parts (the arrays, see shared.wire.arrays). The same
pair travels inside a Redis stream entry (shared/wire/messages.py) and through a Serve DeploymentHandle,
so the replica decodes and validates every payload itself with the same code, whoever sent it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.wire.arrays import ArraySpec, WireError, check_finite, decode_array, encode_array

SCHEMA_VERSION = 1
HASH_PATTERN = r"^[0-9a-f]{32}$"


class Limits(BaseModel):
    """Input bounds enforced by every replica (and the REST layer before it)."""

    max_slices: int = 1024
    max_side: int = 2048
    min_side: int = 8
    max_array_bytes: int = 256 * 1024 * 1024


class WireSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hash: str | None = Field(default=None, pattern=HASH_PATTERN)
    image: ArraySpec | None = None
    probs: ArraySpec | None = None


class AssistCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    slices: list[WireSlice] = Field(min_length=1, max_length=100_000)
    class_ids: list[int] | None = Field(default=None, max_length=256)
    return_probs: bool = False
    bank_version: int | None = None
    # The slices are one volume in through-plane order: answered as a whole (Assistant.predict_volume:
    # neighbouring slices inform each other, components are cleaned in 3D), never mixed with other calls.
    volume: bool = False


class WireSliceResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok", "miss"]
    hash: str
    confidence: list[float | None] | None = None
    label: ArraySpec | None = None
    probs: ArraySpec | None = None


class AssistReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    error_kind: Literal["bad_request", "bank_version", "internal"] | None = None
    slices: list[WireSliceResult] = Field(default_factory=list)
    model_version: str = ""
    bank_version: int = -1
    timing: dict[str, float] = Field(default_factory=dict)


class DecodedSlice(BaseModel):
    """A validated slice, arrays as numpy. image (H, W); probs (C, h, w) float32 in [0, 1]."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    hash: str | None
    image: np.ndarray | None
    probs: np.ndarray | None


def parse_call(meta: bytes | str | dict) -> AssistCall:
    """The call's JSON, validated; raises WireError naming the problem."""
    try:
        if isinstance(meta, dict):
            return AssistCall.model_validate(meta)
        return AssistCall.model_validate_json(meta)
    except ValidationError as exc:
        raise WireError(f"malformed assistant call: {_short(exc)}") from None


def decode_slices(call: AssistCall, blobs: list[bytes], limits: Limits) -> list[DecodedSlice]:
    """Arrays of a call, with shape/dtype/size/finiteness checks."""
    if call.schema_version != SCHEMA_VERSION:
        raise WireError(
            f"schema version {call.schema_version} not supported (this server speaks {SCHEMA_VERSION})"
        )
    if len(call.slices) > limits.max_slices:
        raise WireError(f"{len(call.slices)} slices in one call, at most {limits.max_slices}")
    out = []
    for i, s in enumerate(call.slices):
        if s.image is None and s.hash is None:
            raise WireError(f"slice {i} has neither an image nor a hash")
        image = probs = None
        if s.image is not None:
            image = decode_array(s.image, blobs, limits.max_array_bytes)
            if image.ndim != 2:
                raise WireError(f"slice {i}: image must be 2D (H, W), got shape {image.shape}")
            h, w = image.shape
            if not (limits.min_side <= h <= limits.max_side and limits.min_side <= w <= limits.max_side):
                raise WireError(
                    f"slice {i}: image size {h}×{w} outside [{limits.min_side}, {limits.max_side}]"
                )
            if image.dtype == np.bool_:
                raise WireError(f"slice {i}: a boolean image is not an image")
            check_finite(image, f"slice {i} image")
            if image.dtype == np.float64 and image.size and np.abs(image).max() > np.finfo(np.float32).max:
                raise WireError(f"slice {i} image has values beyond float32's range (served as float32)")
        if s.probs is not None:
            raw = decode_array(s.probs, blobs, limits.max_array_bytes)
            probs = probabilities(raw, f"slice {i} student probabilities", limits)
        out.append(DecodedSlice(hash=s.hash, image=image, probs=probs))
    return out


def probabilities(raw: np.ndarray, what: str, limits: Limits) -> np.ndarray:
    """(C, h, w) probabilities as float32 in [0, 1]; uint8 means p·255 (the compact wire form)."""
    if raw.ndim != 3:
        raise WireError(f"{what} must be 3D (C, H, W), got shape {raw.shape}")
    c, h, w = raw.shape
    if not (
        2 <= c <= 256 and limits.min_side <= h <= limits.max_side and limits.min_side <= w <= limits.max_side
    ):
        raise WireError(
            f"{what} has shape {raw.shape}: need 2-256 classes and sides in [{limits.min_side}, {limits.max_side}]"
        )
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / 255.0
    if raw.dtype.kind != "f":
        raise WireError(f"{what} must be float in [0, 1] or uint8 (p·255), got {raw.dtype}")
    check_finite(raw, what)
    p = raw.astype(np.float32, copy=False)
    if p.min() < -1e-3 or p.max() > 1 + 1e-3:
        raise WireError(f"{what} must lie in [0, 1], found [{p.min():.3g}, {p.max():.3g}]")
    return np.clip(p, 0.0, 1.0)


def encode_call(
    images: list[np.ndarray | None],
    hashes: list[str | None] | None = None,
    probs: list[np.ndarray | None] | None = None,
    class_ids: list[int] | None = None,
    return_probs: bool = False,
    bank_version: int | None = None,
    volume: bool = False,
) -> tuple[AssistCall, list[bytes]]:
    """Build a call from numpy arrays (the client side); `volume`: the slices are one volume, in order."""
    blobs: list[bytes] = []
    n = len(images)
    hashes = hashes or [None] * n
    probs = probs or [None] * n
    slices = []
    for img, h, p in zip(images, hashes, probs):
        slices.append(
            WireSlice(
                hash=h,
                image=encode_array(img, blobs) if img is not None else None,
                probs=encode_array(p, blobs) if p is not None else None,
            )
        )
    return AssistCall(
        slices=slices,
        class_ids=class_ids,
        return_probs=return_probs,
        bank_version=bank_version,
        volume=volume,
    ), blobs


def _short(exc: ValidationError) -> str:
    errs = exc.errors()[:3]
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errs)


def dumps(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=False).encode()

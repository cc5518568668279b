"""Content hashes of slices: the key of the assistant's embedding cache on both sides of the wire."""

from __future__ import annotations

import hashlib

import numpy as np


def slice_hash(image: np.ndarray) -> str:
    """A 128-bit content hash of a 2D slice as it would be sent: dtype, shape and bytes.

    Both the trainer and the assistant call this, so a hash names exactly one array. Shape (H, W).
    """
    arr = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(arr.dtype.str.encode())
    h.update(repr(tuple(arr.shape)).encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

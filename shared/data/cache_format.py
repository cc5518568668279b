"""The prepared cache's format constants and its uint8 quantisation, shared by the writer
(`prepare`) and the reader (`cache_layout`)."""

from __future__ import annotations

import numpy as np

CACHE_FORMAT = "vessa-cache"
CACHE_VERSION = 1
INDEX_NAME = "vessa_cache.json"


def quantise(image: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (round to nearest; |error| <= 0.5/255)."""
    return np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def dequantise(q: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return q.astype(np.float32) * np.float32(1.0 / 255.0)

"""The canonical form of a 2D slice as the assistant sees it, shared by both sides of the wire.

The trainer sends each unlabeled slice in one canonical pose and size (geometric augmentation is applied
to the pseudo-label afterwards), so the assistant's embedding cache, keyed by the content hash of the
canonical slice, hits on every later epoch. Canonical = the data layer's bilinear resize to 256×256
(`shared.data.resize.resize_image`, what the trainer's data loader uses), quantised to uint8. Anything
that precomputes embeddings for a dataset must produce the same bytes, hence this one function.
"""

from __future__ import annotations

import numpy as np

from shared.data.resize import resize_image

CANONICAL_SIZE = 256


def to_uint8(images01: np.ndarray) -> np.ndarray:
    """Quantise images in [0, 1] to uint8 (what travels on the wire: 64 KiB per 256×256 slice)."""
    x = np.clip(np.asarray(images01, dtype=np.float32), 0.0, 1.0)
    return (x * 255.0 + 0.5).astype(np.uint8)


def canonical_slices(images, size: int = CANONICAL_SIZE) -> np.ndarray:
    """(H, W) float images in [0, 1] (a list, or a (B, H, W) array) → (B, size, size) uint8."""
    return to_uint8(np.stack([resize_image(np.asarray(im, dtype=np.float32), (size, size)) for im in images]))

"""The canonical form of a 2D slice as the assistant sees it, shared by both sides of the wire.

The trainer sends each unlabeled slice in one canonical pose and size (geometric augmentation is applied
to the pseudo-label afterwards), so the assistant's embedding cache, keyed by the content hash of the
canonical slice, hits on every later epoch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CANONICAL_SIZE = 256


def resize_images(images: np.ndarray | torch.Tensor, size: int = CANONICAL_SIZE) -> torch.Tensor:
    """Bilinear resize of a batch of 2D images. images: (B, H, W) → (B, size, size) float32."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.shape[-2:] == (size, size):
        return x.clone()
    return F.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def to_uint8(images01: torch.Tensor | np.ndarray) -> np.ndarray:
    """Quantise images in [0, 1] to uint8 (what travels on the wire: 64 KiB per 256×256 slice)."""
    x = torch.as_tensor(images01, dtype=torch.float32).clamp(0, 1)
    return (x * 255.0 + 0.5).to(torch.uint8).numpy()


def canonical_slices(images: np.ndarray | torch.Tensor, size: int = CANONICAL_SIZE) -> np.ndarray:
    """(B, H, W) float images in [0, 1] → (B, size, size) uint8: the canonical slices to send."""
    return to_uint8(resize_images(images, size))

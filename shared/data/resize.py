"""2D resizing in numpy with the same sampling grid as torch's `F.interpolate`.

Pixel centres are aligned (torch `align_corners=False`, OpenCV's convention): output pixel i samples
the input at (i + 0.5) * in / out - 0.5. `resize_image` is bilinear (torch 'bilinear', no
antialiasing); `resize_label` is nearest on the same centres (torch 'nearest-exact'), so a label map
resized to 256 x 256 and back lands on the same pixels as a prediction resized the same way.
"""

from __future__ import annotations

import numpy as np


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left index, right index and right weight (n_out,) for 1D linear interpolation."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)  # torch clamps negative coordinates to 0 and the end to n-1
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index (n_out,) of each output pixel for centre-aligned nearest resizing."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes. image: (..., H, W) float -> (..., h, w) float32."""
    h, w = size
    img = np.asarray(image, dtype=np.float32)
    if img.shape[-2:] == (h, w):
        return img.copy()
    y0, y1, wy = _linear_taps(img.shape[-2], h)
    x0, x1, wx = _linear_taps(img.shape[-1], w)
    rows = img[..., y0, :] * (1 - wy)[:, None] + img[..., y1, :] * wy[:, None]
    return (rows[..., x0] * (1 - wx) + rows[..., x1] * wx).astype(np.float32)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the last two axes; keeps dtype. label: (..., H, W) -> (..., h, w)."""
    h, w = size
    lab = np.asarray(label)
    if lab.shape[-2:] == (h, w):
        return lab.copy()
    return lab[..., nearest_index(lab.shape[-2], h), :][..., nearest_index(lab.shape[-1], w)]

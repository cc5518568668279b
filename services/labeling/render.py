"""Server-side pictures for the review page: one slice of a case as a PNG, the label map as a coloured
overlay on the image (opacity, per-class toggles, window/level), and thumbnails.

No client-side viewer and no build step: the page shows these PNGs. Images arrive min-max normalised to
[0, 1] (services/labeling/cases.read_case), so window centre and width are fractions of that range.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Class colours (RGB), class k takes PALETTE[(k - 1) % len]: distinct on a grey image.
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48), (145, 30, 180),
        (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40),
    ],
    dtype=np.float32,
)


def class_colour(k: int) -> tuple[int, int, int]:
    r, g, b = PALETTE[(k - 1) % len(PALETTE)]
    return int(r), int(g), int(b)


def windowed(image: np.ndarray, centre: float = 0.5, width: float = 1.0) -> np.ndarray:
    """image (H, W) in [0, 1] → uint8 grey with the window [centre − width/2, centre + width/2]."""
    width = max(float(width), 1e-3)
    lo = float(centre) - width / 2
    g = np.clip((np.asarray(image, np.float32) - lo) / width, 0.0, 1.0)
    return np.rint(g * 255).astype(np.uint8)


def overlay(
    image: np.ndarray,
    label: np.ndarray | None,
    opacity: float = 0.45,
    classes: set[int] | None = None,
    centre: float = 0.5,
    width: float = 1.0,
) -> np.ndarray:
    """(H, W, 3) uint8: the windowed image with the classes in `classes` (all when None) tinted."""
    grey = windowed(image, centre, width).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if label is not None and opacity > 0:
        a = float(np.clip(opacity, 0.0, 1.0))
        for k in np.unique(label):
            k = int(k)
            if k == 0 or (classes is not None and k not in classes):
                continue
            m = label == k
            rgb[m] = (1 - a) * rgb[m] + a * PALETTE[(k - 1) % len(PALETTE)]
    return np.rint(rgb).astype(np.uint8)


def png(rgb: np.ndarray, max_side: int | None = None) -> bytes:
    img = Image.fromarray(rgb)
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def thumbnail_slice(label: np.ndarray | None, depth: int) -> int:
    """The slice to show for a case: the one with the most foreground, else the middle."""
    if label is not None and label.any():
        return int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(axis=1)))
    return depth // 2

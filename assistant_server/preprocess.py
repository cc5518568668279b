"""From slices as users send them to the encoder's input, and from 256×256 outputs back to their size."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from assistant_server.modeling.foundation import IMAGE_SIZE


def normalise_slice(image: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each slice to [0, 1], as LiteMedSAM was trained. image: (B, H, W) float."""
    lo = image.amin(dim=(1, 2), keepdim=True)
    hi = image.amax(dim=(1, 2), keepdim=True)
    return (image - lo) / (hi - lo).clamp_min(1e-8)


def encoder_input(images: list[np.ndarray] | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Slices of any size and numeric dtype → (B, 3, 256, 256) float32 in [0, 1] on `device`.

    Slices of one size are resized together; mixed sizes are resized one by one.
    """
    if isinstance(images, np.ndarray):
        arrays = [images] if images.ndim == 2 else list(images)
    else:
        arrays = list(images)
    same = len({a.shape for a in arrays}) == 1
    if same:
        x = torch.as_tensor(np.stack(arrays)).to(device=device, dtype=torch.float32)
        x = _resize(normalise_slice(x)[:, None], IMAGE_SIZE)
    else:
        x = torch.cat(
            [
                _resize(
                    normalise_slice(torch.as_tensor(a, device=device, dtype=torch.float32)[None])[:, None],
                    IMAGE_SIZE,
                )
                for a in arrays
            ]
        )
    return x.expand(-1, 3, -1, -1).contiguous()


def resize_probs(probs: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(B, C, H, W) probabilities → (B, C, size, size), bilinear."""
    return _resize(probs.float(), size)


def _resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    size = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def restore_size(probs: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(C, 256, 256) class probabilities → (C, H, W) at the slice's own size (bilinear)."""
    return _resize(probs[None], shape)[0]

"""2D slice-by-slice inference of the student on a 3D volume (the ACDC protocol).

Every slice is resized to the training resolution (bilinear, as the training slices were), the student
predicts logits, the logits are resized back to the slice's own size (bilinear) and argmax'ed. All the
slices of a volume go through the network in batches.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def resize_images(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialias: the convention of `shared.wire.canonical`).
    x (B, C, H, W) float -> (B, C, size, size)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def resize_labels(y: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Centre-aligned nearest resize of label maps ('nearest-exact', as `shared.data.resize.resize_label`).
    y (B, H, W) integer -> (B, size, size), same dtype."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(y.shape[-2:]) == hw:
        return y
    return F.interpolate(y[:, None].float(), size=hw, mode="nearest-exact")[:, 0].to(y.dtype)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_slices(
    model: nn.Module,
    image: np.ndarray | torch.Tensor,
    image_size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    amp: bool = True,
    return_probs: bool = False,
) -> torch.Tensor:
    """image (D, H, W) float in [0, 1] -> label map (D, H, W) uint8 on the CPU (or, with return_probs,
    softmax (D, C, H, W) float32). The model is used in eval mode and left as it was."""
    device = torch.device(device)
    vol = torch.as_tensor(np.asarray(image, dtype=np.float32))
    d, h, w = vol.shape
    was_training = model.training
    model.eval()
    outs = []
    try:
        for start in range(0, d, batch_size):
            x = vol[start : start + batch_size, None].to(device)
            x = resize_images(x, image_size)
            with autocast_for(device, amp):
                logits = model(x)
            logits = resize_images(logits.float(), (h, w))
            if return_probs:
                outs.append(torch.softmax(logits, dim=1).cpu())
            else:
                outs.append(logits.argmax(dim=1).to(torch.uint8).cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs, dim=0) if outs else torch.zeros((0, h, w), dtype=torch.uint8)

"""Segmentation losses as SSL4MIS and BCP define them, vectorised over classes.

Shapes: logits and probabilities (B, C, H, W); label maps (B, H, W) integer; masks and pixel weights
(B, H, W) float. Everything is computed in float32 (logits from a bf16 autocast region are upcast first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) integer -> (B, C, H, W) float32. A comparison with the class indices rather than
    `F.one_hot`, which on the CPU reads the label range back (two host syncs per call); a label outside
    0..C-1 gives an all-zero row (the data layer has checked labels long before)."""
    classes = torch.arange(num_classes, device=label.device).view(1, -1, 1, 1)
    return (label.unsqueeze(1) == classes).float()


def dice_loss(
    probs: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None = None, smooth: float = 1e-5
) -> torch.Tensor:
    """SSL4MIS/BCP `DiceLoss`: 1 - soft Dice per class over the whole batch, averaged over all C classes
    (background included). Squared-probability denominator, as theirs.

    probs (B, C, H, W) softmax; label (B, H, W); mask (B, H, W) float — pixel weights (BCP's copy-paste
    region mask, optionally times per-pixel pseudo-label weights) or None.
    """
    probs = probs.float()
    target = one_hot(label, probs.shape[1])
    if mask is None:
        inter = (probs * target).sum(dim=(0, 2, 3))
        y_sum = target.sum(dim=(0, 2, 3))
        z_sum = (probs * probs).sum(dim=(0, 2, 3))
    else:
        m = mask.float().unsqueeze(1)
        inter = (probs * target * m).sum(dim=(0, 2, 3))
        y_sum = (target * m).sum(dim=(0, 2, 3))
        z_sum = (probs * probs * m).sum(dim=(0, 2, 3))
    dice = (2 * inter + smooth) / (z_sum + y_sum + smooth)
    return (1 - dice).mean()


def masked_cross_entropy(
    logits: torch.Tensor,
    label: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCP's masked CE: sum(CE * mask [* weight]) / sum(mask). A pixel weight < 1 lowers a pixel's share
    without renormalising, so down-weighted pseudo-labels contribute less in total.

    logits (B, C, H, W); label (B, H, W); mask, weight (B, H, W).
    """
    ce = F.cross_entropy(logits.float(), label.long(), reduction="none")
    m = mask.float()
    num = ce * m if weight is None else ce * m * weight.float()
    return num.sum() / (m.sum() + 1e-16)


def mix_loss(
    logits: torch.Tensor,
    img_label: torch.Tensor,
    patch_label: torch.Tensor,
    mask: torch.Tensor,
    l_weight: float = 1.0,
    u_weight: float = 0.5,
    unlab: bool = False,
    img_pixel_weight: torch.Tensor | None = None,
    patch_pixel_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BCP `mix_loss` for a copy-pasted image: the "image" part is where mask == 1 (outside the pasted
    box), the "patch" part where mask == 0 (inside it).

    Weights: normally image l_weight, patch u_weight; with `unlab=True` (the image part comes from an
    unlabeled slice) image u_weight, patch l_weight. Optional per-pixel weights (B, H, W) for each part
    (VESSA's fused pseudo-labels) multiply into that part's Dice mask and CE.
    Returns (dice, ce), each a scalar tensor.
    """
    probs = torch.softmax(logits.float(), dim=1)
    image_weight, patch_weight = (u_weight, l_weight) if unlab else (l_weight, u_weight)
    mask = mask.float()
    patch_mask = 1.0 - mask
    img_dmask = mask if img_pixel_weight is None else mask * img_pixel_weight
    patch_dmask = patch_mask if patch_pixel_weight is None else patch_mask * patch_pixel_weight
    loss_dice = dice_loss(probs, img_label, img_dmask, smooth=1e-10) * image_weight
    loss_dice = loss_dice + dice_loss(probs, patch_label, patch_dmask, smooth=1e-10) * patch_weight
    loss_ce = image_weight * masked_cross_entropy(logits, img_label, mask, img_pixel_weight)
    loss_ce = loss_ce + patch_weight * masked_cross_entropy(
        logits, patch_label, patch_mask, patch_pixel_weight
    )
    return loss_dice, loss_ce

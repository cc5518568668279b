"""Labeled-only training (SSL4MIS `train_fully_supervised_2D.py` on the labeled patients).

Loss 0.5 * (CE + Dice) on an augmented batch of labeled slices; SGD lr 0.01, momentum 0.9, wd 1e-4,
poly decay (the trainer does the optimisation; this module only computes the loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from student_trainer.losses import dice_loss


def supervised_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """images (B, 1, H, W), labels (B, H, W) -> {"loss", "loss_ce", "loss_dice"} scalar tensors."""
    logits = model(images).float()
    loss_ce = F.cross_entropy(logits, labels.long())
    loss_dice = dice_loss(torch.softmax(logits, dim=1), labels)
    return {"loss": 0.5 * (loss_ce + loss_dice), "loss_ce": loss_ce, "loss_dice": loss_dice}

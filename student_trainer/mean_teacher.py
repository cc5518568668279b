"""Mean teacher (Tarvainen & Valpola 2017) as SSL4MIS `train_mean_teacher_2D.py` runs it on ACDC.

Batch of 24: 12 labeled + 12 unlabeled, one student forward over all 24. Supervised part 0.5*(CE + Dice)
on the labeled half; consistency = MSE between the student's softmax on the unlabeled half and the EMA
teacher's softmax on the same slices plus Gaussian noise (std 0.1, clipped to ±0.2). Consistency weight
0.1 * sigmoid_rampup(iteration // 150, 200), and zero before iteration 1000. Teacher: EMA of the
student's parameters, decay min(1 - 1/(step+1), 0.99) (`student_trainer.ema.update_ema_params`), in
train mode as in SSL4MIS (its own BatchNorm statistics, dropout on).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from student_trainer.config import MeanTeacherSettings
from student_trainer.losses import dice_loss


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """exp(-5 (1 - t)^2), t = clip(current / rampup_length, 0, 1) (Laine & Aila 2017)."""
    if rampup_length == 0:
        return 1.0
    t = min(max(current, 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def consistency_weight(iteration: int, cfg: MeanTeacherSettings) -> float:
    """SSL4MIS: consistency * sigmoid_rampup(iteration // 150, consistency_rampup)."""
    return cfg.consistency * sigmoid_rampup(iteration // cfg.rampup_every, cfg.consistency_rampup)


def mean_teacher_loss(
    model: nn.Module,
    teacher: nn.Module,
    images_l: torch.Tensor,
    labels_l: torch.Tensor,
    images_u: torch.Tensor,
    iteration: int,
    cfg: MeanTeacherSettings,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """images_l (L, 1, H, W), labels_l (L, H, W), images_u (U, 1, H, W); `iteration` counts from 0.

    Returns {"loss", "loss_ce", "loss_dice", "loss_consistency", "consistency_weight"}.
    """
    n_l = images_l.shape[0]
    # `generator` lives on images_u's device (the trainer's device generator), so no host round trip
    noise = torch.randn(images_u.shape, generator=generator, device=images_u.device, dtype=images_u.dtype)
    noise = torch.clamp(noise * cfg.noise_std, -cfg.noise_clip, cfg.noise_clip)
    with torch.no_grad():
        teacher_probs = torch.softmax(teacher(images_u + noise).float(), dim=1)
    logits = model(torch.cat([images_l, images_u], dim=0)).float()
    probs = torch.softmax(logits, dim=1)
    loss_ce = F.cross_entropy(logits[:n_l], labels_l.long())
    loss_dice = dice_loss(probs[:n_l], labels_l)
    supervised = 0.5 * (loss_ce + loss_dice)
    w = consistency_weight(iteration, cfg)
    if iteration < cfg.consistency_start:
        loss_cons = torch.zeros((), device=logits.device)
    else:
        loss_cons = torch.mean((probs[n_l:] - teacher_probs) ** 2)
    return {
        "loss": supervised + w * loss_cons,
        "loss_ce": loss_ce,
        "loss_dice": loss_dice,
        "loss_consistency": loss_cons,
        "consistency_weight": torch.tensor(w),
    }

"""Bidirectional copy-paste (Bai et al., CVPR 2023), following BCP's `ACDC_BCP_train.py`.

Pre-training (labeled only): the 12 labeled slices of a batch are split in halves a and b; a box of
2/3 the image side at a random position is cut from b and pasted into a (`mask` is 1 outside the box,
0 inside); the mixed label is built the same way; loss (Dice + CE)/2 with both parts weighted 1.

Self-training: student initialised from the (best) pre-trained model, teacher = a copy, updated by EMA
of the whole state (0.99). A batch: 12 labeled (halves a, b) + 12 unlabeled (halves ua, ub). The teacher
labels ua and ub (argmax, then the largest connected component per class); with one box mask:
- input_unl = ua outside the box, a inside;  target: pseudo-label(ua) weighted u_weight, label(a) weight 1
- input_l   = b outside the box, ub inside;  target: label(b) weight 1, pseudo-label(ub) weighted u_weight
loss = (Dice + CE)/2 summed over both. Two student forwards of 12, two teacher forwards of 6, as BCP.

Shapes: images (B, 1, H, W) float; labels (B, H, W) int; masks (H, W) or (B, H, W) float.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.components import Backend, largest_connected_component
from shared.data.augment import bcp_copy_paste_mask
from student_trainer.losses import mix_loss


def box_mask(
    height: int,
    width: int,
    ratio: float = 2 / 3,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """BCP `generate_mask` (`shared.data.augment.bcp_copy_paste_mask`): (H, W) float, 0 inside a box of
    int(ratio*H) × int(ratio*W) at a uniformly random position (top-left in [0, H - h) × [0, W - w), as
    np.random.randint), 1 elsewhere; one box for the whole batch, as BCP.

    With a CPU `generator` the position is drawn on the host, so no device sync is needed."""
    return bcp_copy_paste_mask(1, (height, width), ratio, generator, device)[0].float()


def paste(outer: torch.Tensor, inner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """outer where mask == 1, inner where mask == 0. Works for images (B,1,H,W) and labels (B,H,W)."""
    m = mask if outer.dim() == mask.dim() else mask.view(*([1] * (outer.dim() - mask.dim())), *mask.shape)
    if outer.is_floating_point():
        return outer * m + inner * (1 - m)
    return torch.where(m.bool(), outer, inner)


@torch.no_grad()
def teacher_predict(teacher: nn.Module, images: torch.Tensor, train_mode: bool = True) -> torch.Tensor:
    """Teacher softmax (B, C, H, W) float32. BCP keeps its EMA model in train mode (dropout, batch BN)."""
    was_training = teacher.training
    teacher.train(train_mode)
    try:
        return torch.softmax(teacher(images).float(), dim=1)
    finally:
        teacher.train(was_training)


def pseudo_label(probs: torch.Tensor, lcc: bool = True, backend: Backend = "auto") -> torch.Tensor:
    """BCP `get_ACDC_masks(output, nms=1)`: argmax, then the largest connected component per class.
    probs (B, C, H, W) -> (B, H, W) int64."""
    label = probs.argmax(dim=1)
    if lcc:
        label = largest_connected_component(label, probs.shape[1], backend)
    return label


def bcp_pretrain_loss(
    model: nn.Module, images_l: torch.Tensor, labels_l: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Copy-paste among labeled slices. images_l (L, 1, H, W), labels_l (L, H, W), mask (H, W).
    Returns {"loss", "loss_dice", "loss_ce"}."""
    half = images_l.shape[0] // 2
    img_a, img_b = images_l[:half], images_l[half : 2 * half]
    lab_a, lab_b = labels_l[:half], labels_l[half : 2 * half]
    loss_mask = mask.expand(half, *mask.shape)
    out = model(paste(img_a, img_b, mask))
    loss_dice, loss_ce = mix_loss(out, lab_a, lab_b, loss_mask, u_weight=1.0, unlab=True)
    return {"loss": (loss_dice + loss_ce) / 2, "loss_dice": loss_dice, "loss_ce": loss_ce}


def bcp_self_train_loss(
    model: nn.Module,
    images_l: torch.Tensor,
    labels_l: torch.Tensor,
    images_u: torch.Tensor,
    plabels_u: torch.Tensor,
    mask: torch.Tensor,
    u_weight: float = 0.5,
    pixel_weight_u: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Bidirectional copy-paste loss. images_l (L, 1, H, W), labels_l (L, H, W), images_u (U, 1, H, W),
    plabels_u (U, H, W) pseudo-labels of images_u, mask (H, W), pixel_weight_u (U, H, W) optional
    per-pixel weights of the pseudo-labels (VESSA fusion). Returns {"loss", "loss_dice", "loss_ce"}."""
    hl, hu = images_l.shape[0] // 2, images_u.shape[0] // 2
    img_a, img_b = images_l[:hl], images_l[hl : 2 * hl]
    lab_a, lab_b = labels_l[:hl], labels_l[hl : 2 * hl]
    uimg_a, uimg_b = images_u[:hu], images_u[hu : 2 * hu]
    plab_a, plab_b = plabels_u[:hu], plabels_u[hu : 2 * hu]
    w_a = w_b = None
    if pixel_weight_u is not None:
        w_a, w_b = pixel_weight_u[:hu], pixel_weight_u[hu : 2 * hu]
    loss_mask = mask.expand(hl, *mask.shape)

    out_unl = model(paste(uimg_a, img_a, mask))
    out_l = model(paste(img_b, uimg_b, mask))
    unl_dice, unl_ce = mix_loss(
        out_unl, plab_a, lab_a, loss_mask, u_weight=u_weight, unlab=True, img_pixel_weight=w_a
    )
    l_dice, l_ce = mix_loss(out_l, lab_b, plab_b, loss_mask, u_weight=u_weight, patch_pixel_weight=w_b)
    loss_dice = unl_dice + l_dice
    loss_ce = unl_ce + l_ce
    return {"loss": (loss_dice + loss_ce) / 2, "loss_dice": loss_dice, "loss_ce": loss_ce}

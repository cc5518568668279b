"""Fusing the assistant's pseudo-label with the teacher's (the VESSA part of `bcp_vessa`).

Pure tensor logic, no I/O. Inputs for a batch of B unlabeled slices in the *same* pose (the assistant's
label map has already been given the batch's geometric augmentation):

- teacher_label (B, H, W) int: the teacher's pseudo-label (argmax, LCC-cleaned as in BCP);
- teacher_maxprob (B, H, W) float: the teacher's max softmax probability per pixel;
- assistant_label (B, H, W) int: the assistant's label map;
- assistant_conf (B, C) float in [0, 1]: the assistant's confidence per class (index 0 background);
- available (B,) bool: whether the assistant answered for that slice (False: late, missing, invalid).

Output: a label map (B, H, W) int64 and a per-pixel loss weight (B, H, W) float32.

Modes (`mode`, config `vessa.fusion.mode`):

- ``teacher``: the teacher's label everywhere, weight 1. The assistant is consulted but ignored (an
  ablation: same pipeline, BCP's pseudo-labels).
- ``assistant``: the assistant's label everywhere it answered, weight 1.
- ``agree_confidence`` (default): where the two agree, that label with weight 1. Where they disagree,
  the assistant's label if its confidence for that label's class is >= ``tau`` *and* the teacher is
  unsure there (max prob < ``teacher_tau``), otherwise the teacher's label; either way with weight
  ``w_dis`` (a disagreement pixel is less certain than an agreed one; ``w_dis=0`` ignores it).
- ``assistant_confident``: the assistant's label where its confidence for that class is >= ``tau``,
  else the teacher's; weight 1 where they agree and ``w_dis`` where they disagree.

With ``background_overrides=False`` the assistant may override the teacher only with a foreground class:
where it says background and the teacher says an organ, the teacher's label stands (weight ``w_dis``).
The assistant's background confidence is high almost everywhere (most of a slice is background), so
letting it override erases every organ a young teacher finds and the assistant misses.

Slices without an assistant answer always get the teacher's label with weight 1, so a missing assistant
degrades `bcp_vessa` to BCP exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

FusionMode = Literal["teacher", "assistant", "agree_confidence", "assistant_confident"]
FUSION_MODES: tuple[str, ...] = ("teacher", "assistant", "agree_confidence", "assistant_confident")


@dataclass(frozen=True)
class AssistantAnswer:
    """The assistant's answer for a batch of B unlabeled slices, on the training device: labels
    (B, S, S) integer in the canonical (un-augmented) pose, or None when there is no label map at all
    (the teacher's label stands in); confidence (B, C) float32; available (B,) bool, False where the
    slice got no answer (late, missing, invalid)."""

    labels: torch.Tensor | None
    confidence: torch.Tensor
    available: torch.Tensor


@dataclass
class FusedPseudoLabel:
    """label (B, H, W) int64; weight (B, H, W) float32; stats: scalar tensors (not synced to the host:
    `agreement` — fraction of answered pixels where teacher and assistant agree; `from_assistant` —
    fraction of answered pixels whose fused label came from the assistant against the teacher)."""

    label: torch.Tensor
    weight: torch.Tensor
    stats: dict[str, torch.Tensor]


def fuse_pseudo_labels(
    teacher_label: torch.Tensor,
    teacher_maxprob: torch.Tensor,
    assistant_label: torch.Tensor,
    assistant_conf: torch.Tensor,
    available: torch.Tensor,
    mode: FusionMode = "agree_confidence",
    tau: float = 0.5,
    teacher_tau: float = 0.9,
    w_dis: float = 0.5,
    background_overrides: bool = True,
) -> FusedPseudoLabel:
    """Fuse per the module docstring. Shapes: (B, H, W), (B, H, W), (B, H, W), (B, C), (B,)."""
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion mode {mode!r}; expected one of {FUSION_MODES}")
    t_lab = teacher_label.long()
    a_lab = assistant_label.long().to(t_lab.device)
    conf = assistant_conf.float().to(t_lab.device)
    avail = available.bool().to(t_lab.device).view(-1, 1, 1)
    num_classes = conf.shape[1]
    a_lab = a_lab.clamp(0, num_classes - 1)

    agree = t_lab == a_lab
    disagree = ~agree
    # confidence the assistant gives to the class it predicts at each pixel: (B, H, W)
    a_conf = torch.gather(conf, 1, a_lab.flatten(1)).view_as(a_lab)
    a_sure = a_conf >= tau
    if not background_overrides:
        a_sure = a_sure & (a_lab != 0)
    ones = torch.ones_like(t_lab, dtype=torch.float32)

    if mode == "teacher":
        take_a = torch.zeros_like(agree)
        weight = ones
    elif mode == "assistant":
        take_a = disagree
        weight = ones
    elif mode == "agree_confidence":
        take_a = disagree & a_sure & (teacher_maxprob.float() < teacher_tau)
        weight = torch.where(disagree, torch.full_like(ones, w_dis), ones)
    else:  # assistant_confident
        take_a = disagree & a_sure
        weight = torch.where(disagree, torch.full_like(ones, w_dis), ones)

    take_a = take_a & avail
    label = torch.where(take_a, a_lab, t_lab)
    weight = torch.where(avail, weight, ones)

    n_avail = (avail.float().sum() * t_lab.shape[1] * t_lab.shape[2]).clamp(min=1.0)
    stats = {
        "agreement": (agree & avail).float().sum() / n_avail,
        "from_assistant": take_a.float().sum() / n_avail,
        "answered": avail.float().mean(),
    }
    return FusedPseudoLabel(label=label, weight=weight, stats=stats)

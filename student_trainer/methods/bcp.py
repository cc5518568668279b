"""`bcp`: bidirectional copy-paste (`student_trainer.bcp`): labeled-only pre-training, then
self-training with an EMA teacher's pseudo-labels on the unlabeled half of each batch."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from shared.data.augment import GeometricParams
from student_trainer import bcp as bcp_lib
from student_trainer.checkpoint import load_checkpoint
from student_trainer.ema import make_teacher, update_ema_state
from student_trainer.methods.base import StepInputs, TrainingMethod, UnlabeledDraw

if TYPE_CHECKING:
    from student_trainer.config import TrainSettings
    from student_trainer.train import Trainer

log = logging.getLogger(__name__)


class BCPMethod(TrainingMethod):
    """Phases `pretrain` (bcp.pretrain_iters, skipped when 0) and `train` (max_iters). The teacher is
    made at self-training's first step and follows the student's whole state by EMA."""

    name: ClassVar[str] = "bcp"

    @classmethod
    def check_settings(cls, cfg: TrainSettings) -> None:
        super().check_settings(cfg)
        if cfg.labeled_bs % 2 or cfg.batch_size != 2 * cfg.labeled_bs:
            raise ValueError("BCP pairs labeled and unlabeled halves: batch_size = 2 * labeled_bs, even")

    def phases(self) -> list[tuple[str, int]]:
        pre = [("pretrain", self.cfg.bcp.pretrain_iters)] if self.cfg.bcp.pretrain_iters > 0 else []
        return pre + super().phases()

    def start_phase(self, trainer: Trainer, phase: str) -> None:
        """Self-training: student (and its optimizer state) from the best or last pre-trained model;
        teacher = a copy of it."""
        if phase != "train":
            return
        src = trainer.out_dir / "best_pretrain.pt"
        if self.cfg.bcp.init_from == "best" and src.is_file() and len(trainer.phases) > 1:
            ckpt = load_checkpoint(src, map_location=trainer.device)
            trainer.model.load_state_dict(ckpt["model"])
            if "optimizer" in ckpt:
                trainer.optimizer.load_state_dict(ckpt["optimizer"])
            log.info(
                "self-training starts from best_pretrain.pt (step %d, Dice %.4f)",
                ckpt["step"],
                ckpt["best_dice"],
            )
        trainer.teacher = make_teacher(trainer.model)

    def loss(self, inputs: StepInputs, phase: str, phase_step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        mask = inputs.box_mask(cfg.bcp.box_ratio)
        if phase == "pretrain":
            images_l, labels_l = inputs.labeled_batch(self.labeled_per_step())
            with inputs.autocast():
                return bcp_lib.bcp_pretrain_loss(inputs.student, images_l, labels_l, mask)
        draw = inputs.unlabeled(self.unlabeled_per_step())
        images_l, labels_l = inputs.labeled_batch(self.labeled_per_step())
        images_u, params_u = inputs.unlabeled_images(draw)
        teacher = inputs.teacher
        assert teacher is not None, "BCP self-training needs its teacher (made at the phase's start)"
        half = images_u.shape[0] // 2
        with inputs.autocast():
            # BCP labels the two unlabeled halves with two teacher forwards (batch statistics per half)
            probs = torch.cat(
                [
                    bcp_lib.teacher_predict(teacher, images_u[:half], cfg.bcp.teacher_train_mode),
                    bcp_lib.teacher_predict(teacher, images_u[half:], cfg.bcp.teacher_train_mode),
                ]
            )
        plabel = probs.argmax(dim=1)
        if cfg.bcp.lcc:
            plabel = inputs.clean(plabel)
        plabel, weight, extra = self.refine_pseudo_label(inputs, draw, plabel, probs, params_u)
        with inputs.autocast():
            losses = bcp_lib.bcp_self_train_loss(
                inputs.student, images_l, labels_l, images_u, plabel, mask, cfg.bcp.u_weight, weight
            )
        losses.update(extra)
        return losses

    def refine_pseudo_label(
        self,
        inputs: StepInputs,
        draw: UnlabeledDraw,
        label: torch.Tensor,
        probs: torch.Tensor,
        params_u: GeometricParams,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The teacher's pseudo-label (U, S, S) and softmax (U, C, S, S) on the augmented unlabeled
        slices -> (label, per-pixel weight or None, extra logged scalars). BCP: the label as it is."""
        return label, None, {}

    def update_teacher(
        self, student: nn.Module, teacher: nn.Module | None, phase: str, phase_step: int
    ) -> None:
        if phase == "train" and teacher is not None:
            update_ema_state(teacher, student, self.cfg.bcp.ema_decay)

"""`mean_teacher`: SSL4MIS's mean teacher (`student_trainer.mean_teacher`), one phase, eager step only."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from student_trainer.ema import make_teacher, update_ema_params
from student_trainer.mean_teacher import mean_teacher_loss
from student_trainer.methods.base import StepInputs, TrainingMethod


class MeanTeacherMethod(TrainingMethod):
    """Supervised loss on the labeled part + ramped consistency with an EMA teacher on the unlabeled part.

    Not graph-ready: the consistency weight and the EMA decay are Python floats of the iteration."""

    name: ClassVar[str] = "mean_teacher"
    graph_ready: ClassVar[bool] = False

    def initial_teacher(self, student: nn.Module) -> nn.Module | None:
        return make_teacher(student)

    def loss(self, inputs: StepInputs, phase: str, phase_step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        images_l, labels_l = inputs.labeled_batch(self.labeled_per_step())
        images_u, _ = inputs.unlabeled_images(inputs.unlabeled(self.unlabeled_per_step()))
        teacher = inputs.teacher
        assert teacher is not None
        with inputs.autocast():
            return mean_teacher_loss(
                inputs.student, teacher, images_l, labels_l, images_u, phase_step,
                cfg.mean_teacher, inputs.generator,
            )  # fmt: skip

    def update_teacher(
        self, student: nn.Module, teacher: nn.Module | None, phase: str, phase_step: int
    ) -> None:
        if teacher is not None:
            update_ema_params(teacher, student, self.cfg.mean_teacher.ema_decay, phase_step)

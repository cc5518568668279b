"""`supervised`: labeled slices only, one phase (SSL4MIS `train_fully_supervised_2D.py`)."""

from __future__ import annotations

from typing import ClassVar

import torch

from student_trainer.methods.base import StepInputs, TrainingMethod
from student_trainer.supervised import supervised_loss


class SupervisedMethod(TrainingMethod):
    """0.5 * (CE + Dice) on batch_size augmented labeled slices; no teacher."""

    name: ClassVar[str] = "supervised"
    uses_unlabeled: ClassVar[bool] = False

    def loss(self, inputs: StepInputs, phase: str, phase_step: int) -> dict[str, torch.Tensor]:
        images, labels = inputs.labeled_batch(self.labeled_per_step())
        with inputs.autocast():
            return supervised_loss(inputs.student, images, labels)

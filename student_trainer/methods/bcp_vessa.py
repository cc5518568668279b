"""`bcp_vessa`: BCP whose teacher pseudo-labels are fused with the VESSA assistant's answers
(`student_trainer.fusion`). How the answers arrive differs by step: the eager step prefetches one
request per batch (`student_trainer.bcp_vessa.VessaPseudoLabeler`), the graph-ready step reads a table
on the device (`student_trainer.static_step.AssistantTable`) that this method refreshes between steps."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from shared.data.augment import GeometricParams
from student_trainer.data import Augmenter
from student_trainer.fusion import fuse_pseudo_labels
from student_trainer.inference import resize_labels
from student_trainer.methods.base import StepInputs, UnlabeledDraw
from student_trainer.methods.bcp import BCPMethod

if TYPE_CHECKING:
    from student_trainer.train import Trainer


class BCPVessaMethod(BCPMethod):
    """BCP, with each self-training pseudo-label fused with the assistant's (label, pixel weight)."""

    name: ClassVar[str] = "bcp_vessa"
    uses_assistant: ClassVar[bool] = True

    def before_step(self, trainer: Trainer, phase: str, phase_step: int) -> None:
        # the graph-ready step reads the assistant's answers from a table, (re)filled outside the step
        if phase == "train" and trainer.static is not None:
            trainer.static.fill_table(phase_step)

    def refine_pseudo_label(
        self,
        inputs: StepInputs,
        draw: UnlabeledDraw,
        label: torch.Tensor,
        probs: torch.Tensor,
        params_u: GeometricParams,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        answer = draw.answer
        assert answer is not None, "bcp_vessa's unlabeled draws carry the assistant's answer"
        if answer.labels is None:
            a_label = label  # no label map: fusion keeps the teacher's label (available is all False)
        else:
            # the assistant answered on the canonical slice: training size, then this batch's pose
            canonical = resize_labels(answer.labels, self.cfg.data.image_size)
            a_label = Augmenter.apply_geometric(canonical, params_u, "nearest").long()
        f = self.cfg.vessa.fusion
        fused = fuse_pseudo_labels(
            label,
            probs.max(dim=1).values,
            a_label,
            answer.confidence,
            answer.available,
            mode=f.mode,
            tau=f.tau,
            teacher_tau=f.teacher_tau,
            w_dis=f.w_dis,
            background_overrides=f.background_overrides,
        )
        label = fused.label
        if f.lcc_after:
            label = inputs.clean(label)
        return label, fused.weight, {f"vessa_{k}": v for k, v in fused.stats.items()}

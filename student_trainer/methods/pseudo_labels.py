"""`pseudo_labels`: the closed loop's student (services/labeling/loop.py). BCP's bidirectional copy-paste
between labeled slices and slices a labeling job has pseudo-labeled, the pseudo-labels being the job's
(the assistant's, prompted by the previous round's student) rather than an EMA teacher's: no teacher,
no pre-training phase, two student forwards per step.

A batch: labeled_bs labeled slices (halves a, b) and labeled_bs pseudo-labeled ones (halves ua, ub),
each augmented (the pseudo-label gets its slice's transform, nearest); with one box mask,
input ua outside / a inside and b outside / ub inside, as BCP (`student_trainer.bcp.bcp_self_train_loss`);
every pixel of a pseudo-label weighs its slice's weight (the assistant's confidence in that slice, from
`TrainingData.unlabeled_weights`) times `bcp.u_weight`. Runs only on data that carries pseudo-labels
(`load_training_data(..., pseudo=...)`); with no pseudo-labeled slice at all (every one filtered out)
it trains on the labeled copy-paste alone (BCP's pre-training loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from student_trainer import bcp as bcp_lib
from student_trainer.data import Augmenter
from student_trainer.methods.base import StepInputs, TrainingMethod

if TYPE_CHECKING:
    from student_trainer.config import TrainSettings


class PseudoLabelMethod(TrainingMethod):
    name: ClassVar[str] = "pseudo_labels"
    graph_ready: ClassVar[bool] = False

    @classmethod
    def check_settings(cls, cfg: TrainSettings) -> None:
        super().check_settings(cfg)
        if cfg.labeled_bs % 2 or cfg.batch_size != 2 * cfg.labeled_bs:
            raise ValueError("pseudo_labels pairs labeled and pseudo-labeled halves: batch_size = 2 * labeled_bs, even")

    def loss(self, inputs: StepInputs, phase: str, phase_step: int) -> dict[str, torch.Tensor]:
        data = inputs.data
        if data.unlabeled_labels is None or data.unlabeled_weights is None:
            raise ValueError(
                "the pseudo_labels method trains on a labeling job's pseudo-labels: it runs inside "
                "`vessa label --rounds K` (services/labeling/loop.py), not on a dataset alone"
            )
        mask = inputs.box_mask(self.cfg.bcp.box_ratio)
        if data.num_unlabeled == 0:
            images_l, labels_l = inputs.labeled_batch(self.labeled_per_step())
            with inputs.autocast():
                return bcp_lib.bcp_pretrain_loss(inputs.student, images_l, labels_l, mask)
        draw = inputs.unlabeled(self.unlabeled_per_step())
        images_l, labels_l = inputs.labeled_batch(self.labeled_per_step())
        images_u, params_u = inputs.unlabeled_images(draw)
        plabel = Augmenter.apply_geometric(data.unlabeled_labels.index_select(0, draw.indices), params_u, "nearest").long()
        weight = data.unlabeled_weights.index_select(0, draw.indices).view(-1, 1, 1).expand(plabel.shape).contiguous()
        with inputs.autocast():
            losses = bcp_lib.bcp_self_train_loss(
                inputs.student, images_l, labels_l, images_u, plabel, mask, self.cfg.bcp.u_weight, weight
            )
        losses["pseudo_weight"] = weight.mean()
        return losses

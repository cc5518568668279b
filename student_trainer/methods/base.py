"""The interface of a Stage-2 training method, and what a training step hands it.

A method (`TrainingMethod`) says what its batches need (labeled only, or labeled + unlabeled; whether it
asks the assistant), which phases it runs, its loss, and its hooks at a phase's first step, before each
step and after each update (teacher/EMA). It computes its loss once, for both training steps: the eager
step (`student_trainer.train`) and the graph-ready step (`student_trainer.static_step`). What differs
between those two (where indices, BCP's box and augmentations are drawn, how pseudo-labels are cleaned,
which forward is called, whether anything may sync with the host) is behind `StepInputs`, which each
step implements.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from shared.data.augment import GeometricParams
from student_trainer.data import Augmenter, TrainingData
from student_trainer.fusion import AssistantAnswer

if TYPE_CHECKING:  # only for annotations: the trainer imports the methods
    from student_trainer.config import TrainSettings
    from student_trainer.train import Trainer


@dataclass(frozen=True)
class UnlabeledDraw:
    """One step's unlabeled slices: indices (U,) int64 on the training device, and the assistant's
    answer for them (None: the method does not ask the assistant)."""

    indices: torch.Tensor
    answer: AssistantAnswer | None = None


class StepInputs(ABC):
    """Where a method's loss gets its batch, randomness, forwards and pseudo-label cleaning.

    Subclasses implement the draws and the cleaning; gathering and augmenting the drawn slices is the
    same in both steps (the trainer's `Augmenter`, on the device generator), so it lives here. The draw
    order of a loss is part of its result for a seed: each step must draw in the order the loss asks.
    """

    def __init__(self, data: TrainingData, augmenter: Augmenter, generator: torch.Generator) -> None:
        self.data = data
        self.augmenter = augmenter
        self.generator = generator  # the device generator (mean teacher's noise)

    @property
    @abstractmethod
    def student(self) -> nn.Module:
        """The student's training forward."""

    @property
    @abstractmethod
    def teacher(self) -> nn.Module | None:
        """The teacher's forward, or None (no teacher yet, or none at all)."""

    @abstractmethod
    def autocast(self) -> AbstractContextManager[Any]:
        """The mixed-precision context of the forwards."""

    @abstractmethod
    def labeled_indices(self, n: int) -> torch.Tensor:
        """The next n labeled slice indices, (n,) int64 on the device."""

    @abstractmethod
    def unlabeled(self, n: int) -> UnlabeledDraw:
        """The next n unlabeled slice indices (and, for a method that asks it, the assistant's answer)."""

    @abstractmethod
    def box_mask(self, ratio: float) -> torch.Tensor:
        """A BCP copy-paste mask (S, S) float at the training size: 0 inside a random box, 1 outside."""

    @abstractmethod
    def clean(self, label: torch.Tensor) -> torch.Tensor:
        """Largest connected component per class of a label batch (B, S, S) int64."""

    def labeled_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n augmented labeled slices: images (n, 1, S, S) float, labels (n, S, S) int64."""
        idx = self.labeled_indices(n)
        images, labels, _ = self.augmenter(
            self.data.labeled_images.index_select(0, idx), self.data.labeled_labels.index_select(0, idx)
        )
        assert labels is not None
        return images, labels.long()

    def unlabeled_images(self, draw: UnlabeledDraw) -> tuple[torch.Tensor, GeometricParams]:
        """The drawn unlabeled slices, augmented: images (U, 1, S, S) and the transform's parameters
        (to give the assistant's label maps the same pose)."""
        images, _, params = self.augmenter(self.data.unlabeled_images.index_select(0, draw.indices))
        return images, params


class TrainingMethod(ABC):
    """One Stage-2 training method; `name` is its config value (`method:` / `vessa train --method`).

    Class attributes say what its batches need: `uses_unlabeled` (labeled_bs labeled + the rest
    unlabeled, else batch_size labeled), `uses_assistant` (the VESSA assistant's answers, on canonical
    host slices), `graph_ready` (the graph-ready step can run it: its loss and teacher update depend on
    no Python value that changes within a phase, since a phase's step is captured once).
    """

    name: ClassVar[str]
    uses_unlabeled: ClassVar[bool] = True
    uses_assistant: ClassVar[bool] = False
    graph_ready: ClassVar[bool] = True

    def __init__(self, cfg: TrainSettings) -> None:
        self.cfg = cfg

    @classmethod
    def check_settings(cls, cfg: TrainSettings) -> None:
        """Raise ValueError for batch settings this method cannot run with."""
        if cls.uses_unlabeled and not 0 < cfg.labeled_bs < cfg.batch_size:
            raise ValueError("labeled_bs must be in (0, batch_size) for semi-supervised methods")

    def phases(self) -> list[tuple[str, int]]:
        """(name, iterations) of each phase, in order; the last one is always "train"."""
        return [("train", self.cfg.max_iters)]

    def labeled_per_step(self) -> int:
        return self.cfg.labeled_bs if self.uses_unlabeled else self.cfg.batch_size

    def unlabeled_per_step(self) -> int:
        return self.cfg.batch_size - self.cfg.labeled_bs if self.uses_unlabeled else 0

    def initial_teacher(self, student: nn.Module) -> nn.Module | None:
        """The teacher at the start of training (None: none, or one made at a phase switch)."""
        return None

    def start_phase(self, trainer: Trainer, phase: str) -> None:
        """At the first step of `phase` (not on a resume inside it)."""
        return None

    def before_step(self, trainer: Trainer, phase: str, phase_step: int) -> None:
        """Before each step, outside the step itself (and outside a captured graph)."""
        return None

    @abstractmethod
    def loss(self, inputs: StepInputs, phase: str, phase_step: int) -> dict[str, torch.Tensor]:
        """The step's losses as scalar tensors on the device, "loss" the one to minimise."""

    def update_teacher(
        self, student: nn.Module, teacher: nn.Module | None, phase: str, phase_step: int
    ) -> None:
        """After the optimiser step (inside the graph-ready step's capture)."""
        return None

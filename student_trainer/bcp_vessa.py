"""BCP with the VESSA assistant: the teacher's pseudo-labels for the unlabeled half of each batch are
fused with the assistant's (`student_trainer.fusion`), everything else is BCP (`student_trainer.bcp`).

Per self-training step t (global step numbers; `start_step` is the first self-training step):

1. `VessaPseudoLabeler.batch(t)` keeps the plan `vessa.prefetch` steps ahead: for each newly planned
   step s it draws the unlabeled indices and submits one `PseudoLabelRequest` with the canonical
   (un-augmented) slices, their keys and — after `vessa.warmup_iters` self-training steps — the
   teacher's softmax on those canonical slices (eval mode), else None (templates-only prompting).
   It then takes step t's answer (waiting at most `vessa.timeout_s`) or None (fallback, counted).
2. The trainer augments the canonical slices (random geometric + params), the teacher labels the
   augmented slices (BCP: argmax + largest connected component).
3. `VessaPseudoLabeler.answer(...)` puts step t's answer on the device (`fusion.AssistantAnswer`);
   the `bcp_vessa` method (`student_trainer.methods.bcp_vessa`) gives the assistant's label map the
   same geometric transform (nearest) and fuses it with the teacher's label into (label, pixel
   weight) for BCP's loss.

Exact link call pattern: `link.submit(PseudoLabelRequest(keys, images (B,S,S) float32 [0,1],
student_probs (B,C,S,S) float32 | None)) -> id` once per planned step, from the training thread, up to
`prefetch` steps before the step uses it; then `link.result(id, timeout_s)` once, at that step.
`link.stats()` is read for logs; `link.close()` at the end of training.
"""

from __future__ import annotations

import importlib
import logging
from collections import deque
from collections.abc import Callable

import numpy as np
import torch

from student_trainer.assistant_link import AssistantLink, PseudoLabelRequest, PseudoLabelResult
from student_trainer.config import AssistantLinkSettings
from student_trainer.data import to_device
from student_trainer.fusion import AssistantAnswer
from student_trainer.prefetch import PseudoLabelPrefetcher

log = logging.getLogger(__name__)


def build_link(cfg: AssistantLinkSettings) -> AssistantLink | None:
    """The link named by `vessa.link` ('module:callable', called with `vessa.link_kwargs`), or None."""
    if not cfg.link:
        return None
    module_name, _, attr = cfg.link.partition(":")
    if not attr:
        raise ValueError(f"vessa.link must look like 'package.module:factory', got {cfg.link!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**cfg.link_kwargs)


class VessaPseudoLabeler:
    """Plans unlabeled batches ahead, asks the assistant, fuses its answers with the teacher's labels.

    unlabeled_host: (N, S, S) float32 numpy — the canonical unlabeled slices (what the assistant sees);
    keys: N slice keys; draw_indices(): the next unlabeled batch (list of ints) from the trainer's sampler;
    prompt_probs(indices): the teacher's softmax (B, C, S, S) float32 numpy on those canonical slices.
    """

    def __init__(
        self,
        link: AssistantLink | None,
        cfg: AssistantLinkSettings,
        unlabeled_host: np.ndarray,
        keys: list[str],
        num_classes: int,
        draw_indices: Callable[[], list[int]],
        prompt_probs: Callable[[list[int]], np.ndarray],
        start_step: int,
    ) -> None:
        self.link = link
        self.cfg = cfg
        self.images = unlabeled_host
        self.keys = keys
        self.num_classes = num_classes
        self.draw_indices = draw_indices
        self.prompt_probs = prompt_probs
        self.start_step = start_step
        size = unlabeled_host.shape[-2:]
        self.prefetcher = PseudoLabelPrefetcher(
            link, cfg.prefetch, cfg.timeout_s, (int(size[0]), int(size[1])), num_classes, cfg.log_every
        )
        self.restored: deque[list[int]] = deque()

    def restore_plan(self, planned: list[list[int]]) -> None:
        """Reuse batches drawn before a checkpoint (their requests are resubmitted, with fresh prompts)."""
        self.restored = deque(list(map(int, b)) for b in planned)

    def planned_indices(self) -> list[list[int]]:
        return self.prefetcher.planned_indices() + [list(b) for b in self.restored]

    def in_warmup(self, step: int) -> bool:
        return step - self.start_step < self.cfg.warmup_iters

    def plan_next(self, step: int) -> tuple[list[int], PseudoLabelRequest | None]:
        indices = self.restored.popleft() if self.restored else list(self.draw_indices())
        if self.link is None:
            return indices, None  # no assistant: plan the batch only, no request and no teacher forward
        probs = None if self.in_warmup(step) else np.ascontiguousarray(self.prompt_probs(indices), np.float32)
        request = PseudoLabelRequest(
            keys=[self.keys[i] for i in indices],
            images=np.ascontiguousarray(self.images[indices], dtype=np.float32),
            student_probs=probs,
        )
        return indices, request

    def batch(self, step: int) -> tuple[list[int], PseudoLabelResult | None]:
        """Step `step`'s unlabeled indices and the assistant's answer (None: fall back to the teacher)."""
        self.prefetcher.fill(step, self.plan_next)
        result, entry = self.prefetcher.take(step)
        return entry.indices, result

    def answer(self, result: PseudoLabelResult | None, batch: int, device: torch.device) -> AssistantAnswer:
        """A step's answer on the device: canonical labels (B, S, S) int64 and confidence (B, C), or,
        with no answer (fallback), no labels, zero confidence and nothing available."""
        if result is None:
            return AssistantAnswer(
                labels=None,
                confidence=torch.zeros(batch, self.num_classes, device=device),
                available=torch.zeros(batch, dtype=torch.bool, device=device),
            )
        return AssistantAnswer(
            labels=to_device(torch.from_numpy(np.asarray(result.labels, dtype=np.int64)), device),
            confidence=to_device(torch.from_numpy(np.asarray(result.confidence, dtype=np.float32)), device),
            available=torch.ones(batch, dtype=torch.bool, device=device),
        )

    def summary(self) -> dict[str, float]:
        return self.prefetcher.summary()

    def close(self) -> None:
        self.prefetcher.discard()
        if self.link is not None:
            try:
                self.link.close()
            except Exception as exc:  # closing a dead link is not an error worth stopping for
                log.warning("closing the assistant link failed: %s", exc)

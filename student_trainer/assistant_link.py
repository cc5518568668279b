"""How the student trainer talks to the VESSA assistant, whatever the transport.

Implementations: the Redis streaming client (`student_trainer.stream_link.StreamAssistantLink`), and
an in-process one for GPU runs where Ray does not fit (`student_trainer.inprocess_link`). The trainer
only sees this protocol, so it cannot tell (and need not care) which one it uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class PseudoLabelRequest:
    """One unlabeled batch in its canonical pose (no geometric augmentation).

    images: (B, H, W) float32 in [0, 1]; student_probs: (B, C, H, W) float32 softmax over all C classes
    (background first) or None (templates-only prompting, the warm-up); keys: B slice keys, for logs.
    """

    keys: list[str]
    images: np.ndarray
    student_probs: np.ndarray | None = None


@dataclass
class PseudoLabelResult:
    """The assistant's answer. labels: (B, H, W) uint8; confidence: (B, C) float32 in [0, 1], index 0 is
    background; probs: (B, C, H, W) float32 or None; model/bank versions for provenance."""

    labels: np.ndarray
    confidence: np.ndarray
    probs: np.ndarray | None = None
    model_version: str = ""
    bank_version: int = 0


class AssistantLink(Protocol):
    def submit(self, request: PseudoLabelRequest) -> str:
        """Queue a request; returns its id at once (never blocks on the assistant's work)."""

    def result(self, request_id: str, timeout: float) -> PseudoLabelResult | None:
        """The result, waiting at most `timeout` s; None when it is late, failed or the assistant is
        unreachable: the caller falls back to its teacher and counts it."""

    def stats(self) -> dict:
        """Counters: submitted, answered, late, failed, fallbacks, mean latency."""

    def close(self) -> None: ...

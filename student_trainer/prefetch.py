"""Requests to the assistant that run ahead of training, with bounded staleness and a teacher fallback.

The trainer plans its unlabeled batches ahead: while it trains step t, the requests for steps up to
t + depth are already submitted (`depth` = config `vessa.prefetch`), so the assistant works while the
GPU trains and a prompt is at most `depth` steps older than the step that uses its answer.

`take(step)` waits at most `timeout_s` for that step's answer. No answer — late, failed, malformed, the
link raised, or the assistant is gone — is a *fallback*: the caller uses its teacher's pseudo-label for
that batch. Fallbacks are counted and logged (the first one, then every `log_every`-th, and a line when
answers come back); nothing here raises because of the assistant, so training carries on and recovers
by itself when the assistant returns.

Pure logic over an `AssistantLink`; the tensors and the model stay in the caller.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from student_trainer.assistant_link import AssistantLink, PseudoLabelRequest, PseudoLabelResult

log = logging.getLogger(__name__)


@dataclass
class PendingRequest:
    """One planned unlabeled batch: the step that will use it, its slice indices, the link's request id
    (None when submitting failed or there is no link) and when it was submitted."""

    step: int
    indices: list[int]
    request_id: str | None
    submitted_at: float
    with_probs: bool


@dataclass
class PrefetchStats:
    submitted: int = 0
    submit_errors: int = 0
    answered: int = 0
    fallbacks: int = 0
    late_or_missing: int = 0
    invalid: int = 0
    result_errors: int = 0
    discarded: int = 0
    wait_s_total: float = 0.0
    age_s_total: float = 0.0
    consecutive_fallbacks: int = 0

    def as_dict(self) -> dict[str, float]:
        taken = self.answered + self.fallbacks
        return {
            "submitted": self.submitted,
            "submit_errors": self.submit_errors,
            "answered": self.answered,
            "fallbacks": self.fallbacks,
            "late_or_missing": self.late_or_missing,
            "invalid": self.invalid,
            "result_errors": self.result_errors,
            "discarded": self.discarded,
            "fallback_rate": self.fallbacks / taken if taken else 0.0,
            "mean_wait_s": self.wait_s_total / taken if taken else 0.0,
            "mean_age_s": self.age_s_total / self.answered if self.answered else 0.0,
        }


def validate_result(
    result: PseudoLabelResult, batch: int, height: int, width: int, num_classes: int
) -> str | None:
    """Why `result` cannot be used for a (batch, height, width) request with num_classes, or None."""
    labels = np.asarray(result.labels)
    conf = np.asarray(result.confidence)
    if labels.shape != (batch, height, width):
        return f"labels shape {labels.shape} != {(batch, height, width)}"
    if conf.shape != (batch, num_classes):
        return f"confidence shape {conf.shape} != {(batch, num_classes)}"
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        return f"labels outside [0, {num_classes})"
    if not np.all(np.isfinite(conf)):
        return "non-finite confidence"
    return None


class PseudoLabelPrefetcher:
    """Keeps up to `depth` + 1 requests planned (the current step's and `depth` ahead).

    Usage per training step t:
        prefetcher.fill(t, plan_next)      # submits requests for t .. t + depth not yet planned
        result, entry = prefetcher.take(t) # this step's answer or None (fallback, counted)
    `plan_next(step)` returns (indices, request) for a step: the caller draws the unlabeled batch and
    builds the request (canonical images, teacher probabilities or None in the warm-up).
    """

    def __init__(
        self,
        link: AssistantLink | None,
        depth: int,
        timeout_s: float,
        image_hw: tuple[int, int],
        num_classes: int,
        log_every: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if depth < 0:
            raise ValueError("prefetch depth must be >= 0")
        self.link = link
        self.depth = depth
        self.timeout_s = timeout_s
        self.image_hw = image_hw
        self.num_classes = num_classes
        self.log_every = max(1, log_every)
        self.clock = clock
        self.pending: deque[PendingRequest] = deque()
        self.stats = PrefetchStats()

    # -- planning ---------------------------------------------------------------------------------
    def next_step_to_plan(self, current_step: int) -> int:
        return self.pending[-1].step + 1 if self.pending else current_step

    def fill(
        self, current_step: int, plan_next: Callable[[int], tuple[list[int], PseudoLabelRequest | None]]
    ) -> None:
        """Plan and submit every step from the last planned one up to current_step + depth."""
        step = self.next_step_to_plan(current_step)
        while step <= current_step + self.depth:
            indices, request = plan_next(step)
            self.submit(step, indices, request)
            step += 1

    def submit(self, step: int, indices: list[int], request: PseudoLabelRequest | None) -> PendingRequest:
        """Submit `request` for `step` (None: plan the batch without asking the assistant)."""
        if self.pending and step != self.pending[-1].step + 1:
            raise ValueError(f"steps must be planned in order: got {step} after {self.pending[-1].step}")
        rid: str | None = None
        if request is not None and self.link is not None:
            try:
                rid = self.link.submit(request)
                self.stats.submitted += 1
            except Exception as exc:  # the assistant must never stop training
                self.stats.submit_errors += 1
                if self.stats.submit_errors == 1 or self.stats.submit_errors % self.log_every == 0:
                    log.warning("assistant submit failed (%d so far): %s", self.stats.submit_errors, exc)
        entry = PendingRequest(
            step=step,
            indices=list(indices),
            request_id=rid,
            submitted_at=self.clock(),
            with_probs=bool(request is not None and request.student_probs is not None),
        )
        self.pending.append(entry)
        return entry

    # -- consuming --------------------------------------------------------------------------------
    def take(self, step: int) -> tuple[PseudoLabelResult | None, PendingRequest]:
        """This step's planned batch and the assistant's answer, or None (a counted fallback)."""
        if not self.pending or self.pending[0].step != step:
            head = self.pending[0].step if self.pending else None
            raise RuntimeError(f"step {step} was not planned (next planned: {head})")
        entry = self.pending.popleft()
        result: PseudoLabelResult | None = None
        reason = "not submitted"
        t0 = self.clock()
        if entry.request_id is not None and self.link is not None:
            try:
                result = self.link.result(entry.request_id, self.timeout_s)
                reason = "late or missing" if result is None else ""
                if result is None:
                    self.stats.late_or_missing += 1
            except Exception as exc:
                self.stats.result_errors += 1
                reason = f"error: {exc}"
                result = None
        wait = self.clock() - t0
        self.stats.wait_s_total += wait
        if result is not None:
            problem = validate_result(result, len(entry.indices), *self.image_hw, self.num_classes)
            if problem is not None:
                self.stats.invalid += 1
                reason = f"invalid result: {problem}"
                result = None
        if result is None:
            self._count_fallback(step, reason)
        else:
            if self.stats.consecutive_fallbacks:
                log.info(
                    "assistant answers again at step %d after %d fallbacks in a row",
                    step,
                    self.stats.consecutive_fallbacks,
                )
            self.stats.consecutive_fallbacks = 0
            self.stats.answered += 1
            self.stats.age_s_total += self.clock() - entry.submitted_at
        return result, entry

    def _count_fallback(self, step: int, reason: str) -> None:
        self.stats.fallbacks += 1
        self.stats.consecutive_fallbacks += 1
        n = self.stats.fallbacks
        if reason != "not submitted" and (n == 1 or n % self.log_every == 0):
            log.warning("step %d: no assistant pseudo-label (%s); teacher fallback #%d", step, reason, n)

    # -- state ------------------------------------------------------------------------------------
    def planned_indices(self) -> list[list[int]]:
        """The planned, not yet consumed unlabeled batches, oldest first (saved with checkpoints so a
        resumed run sees the same data order; their requests are not: they are resubmitted)."""
        return [list(e.indices) for e in self.pending]

    def discard(self) -> int:
        """Forget every in-flight request (their late answers are ignored by the link). Returns how many."""
        n = len(self.pending)
        self.stats.discarded += n
        self.pending.clear()
        return n

    def summary(self) -> dict[str, float]:
        out = self.stats.as_dict()
        if self.link is not None:
            try:
                out.update(
                    {f"link_{k}": v for k, v in self.link.stats().items() if isinstance(v, int | float)}
                )
            except Exception:  # stats are informational only
                pass
        return out

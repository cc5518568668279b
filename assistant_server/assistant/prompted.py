"""Prompt-to-mask: one image, one class, the user's own points, box or mask (`POST /v1/segment`); what
is not given is derived from the templates, as for a pseudo-label."""

from __future__ import annotations

import time

import numpy as np
import torch

from assistant_server.assistant.types import AssistantInputError, SliceInput
from assistant_server.modeling.foundation import IMAGE_SIZE
from assistant_server.modeling.structured_prompts import (
    BOX_BOTTOM_RIGHT,
    BOX_TOP_LEFT,
    NEGATIVE,
    POSITIVE,
    SparsePrompts,
)
from assistant_server.preprocess import resize_probs, restore_size


class PromptedSegmentation:
    """The explicit-prompt side of `Assistant` (a mixin over its encoder, bank state and forward pass)."""

    def segment(
        self,
        image: np.ndarray,
        class_id: int,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float]:
        """Prompt-to-mask for one (H, W) image and one class.

        points: (P, 2) x, y in the image's pixels with point_labels (P,) 1 positive / 0 negative;
        box: (4,) x0, y0, x1, y1 in pixels; mask: (H, W) probabilities in [0, 1]. Prompts that are not
        given are derived from the templates. Returns the (H, W) bool mask and its confidence.
        """
        ids = self._check_class_ids([class_id])
        state = self.bank_state()
        if len(state.keys) == 0:
            raise AssistantInputError("the template bank is empty: add templates first")
        h, w = image.shape
        sx, sy = IMAGE_SIZE / w, IMAGE_SIZE / h
        coords, labels = [], []
        if box is not None:
            x0, y0, x1, y1 = [float(v) for v in box]
            coords += [[x0 * sx, y0 * sy], [x1 * sx, y1 * sy]]
            labels += [BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]
        if points is not None:
            for (x, y), lab in zip(
                points, point_labels if point_labels is not None else np.ones(len(points))
            ):
                coords.append([float(x) * sx, float(y) * sy])
                labels.append(POSITIVE if int(lab) == 1 else NEGATIVE)
        sparse = None
        if coords:
            sparse = SparsePrompts(
                torch.tensor([coords], dtype=torch.float32, device=self.device),
                torch.tensor([labels], dtype=torch.long, device=self.device),
            )
        mask_prompt = None
        if mask is not None:
            mask_prompt = resize_probs(
                torch.as_tensor(mask, dtype=torch.float32, device=self.device)[None, None]
            )
        hashes, embs, _ = self.embeddings([SliceInput(image=image)])
        t0 = time.perf_counter()
        out = self._forward(embs[0][None], state, ids, sparse_prompts=sparse, mask_prompt=mask_prompt)
        logits = restore_size(out.logits[0].float(), (h, w))[0]
        with self._lock:
            self._stats["decoder_s"] += time.perf_counter() - t0
        return (logits > 0).cpu().numpy(), float(out.confidence[0, 0])

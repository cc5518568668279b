"""Volume prediction: the slices of one volume as one piece, with what a volume allows beyond slices:
refinement prompts blended with the neighbouring slices' answers, the volume's own most confident
slices as extra templates, and the component cleaning in 3D."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.nn.functional as F

from assistant_server.assistant.bank_state import BankState
from assistant_server.assistant.types import SliceInput, SliceOutput
from assistant_server.bank import global_descriptor
from assistant_server.modeling.foundation import IMAGE_SIZE
from shared.components import keep_largest


class VolumePrediction:
    """The volume side of `Assistant` (a mixin: it uses the assistant's bank state, passes and cleaning)."""

    def predict_volume(
        self,
        slices: list[SliceInput],
        class_ids: list[int] | None = None,
        return_probs: bool = False,
    ) -> list[SliceOutput]:
        """Pseudo-label the slices of one volume, in order (z = 0 … D-1), as one piece.

        As `predict`, plus what a volume allows: each refinement pass prompts slice z with its own last
        answer blended with those of z-1 and z+1 (`options.volume_context`), and the component cleaning
        runs in 3D. Slices with a student prompt keep it and are not refined. A slice whose hash the cache
        does not know comes back as a miss, and the volume is answered without it.
        """
        ids, state = self._checked_request(slices, class_ids)
        if not slices:
            return []
        num_classes = len(self.classes)
        hashes, embs, shapes = self.embeddings(slices)
        outputs: list[SliceOutput | None] = [
            SliceOutput(status="miss", slice_hash=h) if e is None else None for h, e in zip(hashes, embs)
        ]
        present = [i for i, e in enumerate(embs) if e is not None]
        with self._lock:
            self._stats["misses"] += len(slices) - len(present)
        if not present:
            return outputs  # type: ignore[return-value]
        student = [
            None if slices[i].student_probs is None else self._student_map(slices[i].student_probs)
            for i in present
        ]
        self._sync()
        t0 = time.perf_counter()
        emb = torch.stack([embs[i] for i in present])
        depth = max(len(slices) - 1, 1)
        positions = torch.tensor([i / depth for i in present], device=self.device)
        probs, conf = self._volume_pass(emb, state, ids, student, positions)
        refine = [j for j, st in enumerate(student) if st is None]
        exclude = None
        if refine and self.options.volume_templates > 0 and len(present) > 1:
            state, exclude = self._with_volume_templates(state, emb, probs, conf, positions, ids)
            if self.options.refine_passes == 0:
                new_probs, _ = self._volume_pass(emb, state, ids, [None] * len(present), positions, exclude)
                probs[refine] = new_probs[refine]
        w = float(self.options.volume_context)
        if refine:  # with options.refine_below, only the slices whose first pass was unsure
            gated = set(self._needs_refinement(conf).tolist())
            refine = [j for j in refine if j in gated]
        rows = torch.tensor(refine, dtype=torch.long, device=self.device)
        for _ in range(self.options.refine_passes if refine else 0):
            prompt = self._as_prompt(probs, ids)
            if w > 0 and len(present) > 1:
                prev = torch.cat([prompt[:1], prompt[:-1]])
                nxt = torch.cat([prompt[1:], prompt[-1:]])
                prompt = (1 - 2 * w) * prompt + w * prev + w * nxt
            # Only the refined slices go through the decoder again; the others' answers stand.
            pos = None if positions is None else positions[rows]
            ex = None if exclude is None else exclude[rows]
            new_probs, _ = self._volume_pass(emb[rows], state, ids, list(prompt[rows]), pos, ex)
            probs[rows] = new_probs  # the confidence stays the first pass's (see _decode)
        finished = [
            self._finish(hashes[i], shapes[i], probs[j], conf[j], ids, num_classes, return_probs)
            for j, i in enumerate(present)
        ]
        lcc_ids = self._lcc_classes(state, ids)
        same_size = len({o.label.shape for o in finished}) == 1
        if lcc_ids and same_size:
            volume = keep_largest(
                np.stack([o.label for o in finished]), lcc_ids, self.options.component_keep_share
            )
            for o, lab in zip(finished, volume):
                o.label = lab
        elif lcc_ids:
            for o in finished:
                o.label = keep_largest(o.label, lcc_ids, self.options.component_keep_share)
        for j, i in enumerate(present):
            outputs[i] = finished[j]
        self._count_batch(t0, len(slices))
        return outputs  # type: ignore[return-value]

    def _with_volume_templates(
        self,
        state: BankState,
        emb: torch.Tensor,
        probs: torch.Tensor,
        conf: torch.Tensor,
        positions: torch.Tensor,
        ids: list[int],
    ) -> tuple[BankState, torch.Tensor]:
        """The bank plus the volume's K most confident slices with foreground as templates, labelled by
        the first pass's answer (emb (Z, 256, 64, 64), probs (Z, 1+M, 256, 256), conf (Z, M)).
        Returns that state and `exclude` (Z, N + K) bool: True where a template is the query itself."""
        answer = probs.argmax(1)  # (Z, H, W) over [background, *ids]
        has_fg = (answer > 0).flatten(1).any(1)
        score = conf.mean(1).masked_fill(~has_fg, float("-inf"))
        k = min(int(self.options.volume_templates), int(has_fg.sum()))
        exclude = torch.zeros(len(emb), len(state.keys) + k, dtype=torch.bool, device=self.device)
        if k == 0:
            return state, exclude[:, : len(state.keys)]
        sel = score.topk(k).indices
        lut = torch.tensor([0, *ids], device=answer.device)
        onehot = F.one_hot(lut[answer[sel]], len(self.classes)).permute(0, 3, 1, 2).float()
        with torch.inference_mode(), self._autocast():
            e = emb[sel].to(torch.float32) if self.device.type == "cpu" else emb[sel]
            keys = self.model.template_keys(e).float()
            grid = self.model.matcher.label_grid(onehot)
            desc = global_descriptor(e)
        extra = dataclasses.replace(
            state,
            keys=torch.cat([state.keys, keys]),
            label_grid=torch.cat([state.label_grid, grid.to(state.label_grid.dtype)]),
            descriptors=torch.cat([state.descriptors, desc.to(state.descriptors.dtype)]),
            positions=None
            if state.positions is None
            else torch.cat([state.positions, positions[sel].to(state.positions.dtype)]),
        )
        exclude[sel, len(state.keys) + torch.arange(k, device=self.device)] = True
        return extra, exclude

    def _volume_pass(
        self,
        emb: torch.Tensor,
        state: BankState,
        ids: list[int],
        student: list[torch.Tensor | None],
        positions: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder pass over a volume's slices, in chunks, each slice with its own prompt or none
        (exclude: (Z, N) templates a slice may not retrieve, or None).
        Returns probs (Z, 1+M, 256, 256) and confidence (Z, M)."""
        probs = torch.empty(len(emb), 1 + len(ids), IMAGE_SIZE, IMAGE_SIZE, device=self.device)
        conf = torch.empty(len(emb), len(ids), device=self.device)
        for prompted in (False, True):
            group = [j for j, st in enumerate(student) if (st is not None) == prompted]
            for start in range(0, len(group), self.encode_batch):
                chunk = group[start : start + self.encode_batch]
                st = torch.stack([student[j] for j in chunk]) if prompted else None
                pos = None if positions is None else positions[chunk]
                ex = None if exclude is None else exclude[chunk]
                p, c = self._pass(emb[chunk], state, ids, st, pos, ex)
                probs[chunk], conf[chunk] = p, c
        return probs, conf

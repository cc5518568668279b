"""The one inference entry point of the assistant, used by the server, the dispatcher, tests and benchmarks.

    slices (image and/or content hash, optional student probabilities) + class subset
        → per slice: label map, per-class confidence, optionally per-class probabilities.

Batched and device-agnostic (bf16 autocast on a GPU). The encoder runs only for slices the embedding
cache has not seen; a slice sent by hash alone that the cache does not know comes back as a miss, and
the caller resends it with its pixels. Encoder and decoder time are counted separately in `stats()`.

A templates-only answer (no student prompt) depends only on the slice, the bank version and the class
subset, so it is kept (LRU, `answer_cache_entries`): a trainer's warm-up asks for the same unlabeled slices
once per epoch, and every repeat is answered without the decoder.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from assistant_server.bank import TemplateBank, global_descriptor
from assistant_server.checkpoint import build_model, load_checkpoint
from assistant_server.components import keep_largest, single_component_classes
from assistant_server.embedding_cache import EmbeddingCache
from assistant_server.inference_options import InferenceOptions
from assistant_server.modeling.foundation import IMAGE_SIZE, module_state_hash
from assistant_server.modeling.structured_prompts import (
    BOX_BOTTOM_RIGHT,
    BOX_TOP_LEFT,
    NEGATIVE,
    POSITIVE,
    SparsePrompts,
)
from assistant_server.modeling.vessa import VessaConfig, VessaModel, combine_classes
from assistant_server.precision import autocast
from assistant_server.preprocess import encoder_input, resize_probs, restore_size
from shared.data.types import ClassInfo
from shared.hashing import slice_hash


class AssistantInputError(ValueError):
    """A request the assistant cannot answer as asked: the message says what was wrong."""


class BankVersionError(AssistantInputError):
    """The request pins a bank version that is not the one being served."""


@dataclass
class SliceInput:
    """One slice to pseudo-label. image: (H, W) numeric or None when sent by `slice_hash` alone;
    student_probs: (C, H', W') float in [0, 1] (any size, resized to the slice) or None."""

    image: np.ndarray | None = None
    slice_hash: str | None = None
    student_probs: np.ndarray | None = None


@dataclass
class SliceOutput:
    """status "ok" or "miss" (hash unknown: resend the image). label: (H, W) uint8; confidence: (C,)
    float32 per class, background first, NaN for classes not asked for; probs: (C, H, W) float16."""

    status: str
    slice_hash: str
    label: np.ndarray | None = None
    confidence: np.ndarray | None = None
    probs: np.ndarray | None = None


def _relative_positions(bank: TemplateBank) -> torch.Tensor:
    """(N,) each exemplar's position within its case, 0 at its first slice and 1 at its last (0.5 for a
    case with one exemplar), from the exemplars' slice indices."""
    span: dict[str, tuple[int, int]] = {}
    for e in bank.exemplars:
        lo, hi = span.get(e.case_id, (e.slice_index, e.slice_index))
        span[e.case_id] = (min(lo, e.slice_index), max(hi, e.slice_index))
    pos = []
    for e in bank.exemplars:
        lo, hi = span[e.case_id]
        pos.append(0.5 if hi == lo else (e.slice_index - lo) / (hi - lo))
    return torch.tensor(pos, dtype=torch.float32)


def _copy_output(out: SliceOutput) -> SliceOutput:
    """A remembered answer's own arrays: what a caller does with its copy never reaches the cache."""
    return dataclasses.replace(out, label=out.label.copy(), confidence=out.confidence.copy())


@dataclass
class _BankState:
    version: int
    keys: torch.Tensor  # (N, D, G, G)
    label_grid: torch.Tensor  # (N, C, G, G)
    descriptors: torch.Tensor  # (N, 4096)
    text: torch.Tensor  # (C, 384)
    patients: list[str] = field(default_factory=list)
    single_component: list[int] = field(default_factory=list)  # classes whose exemplars are one blob
    positions: torch.Tensor | None = None  # (N,) each exemplar's relative position in its case, 0..1


# Slices per encoder (and decoder) call. On a CPU a large batch is slower per slice and its activations
# take gigabytes (16 slices: 1.5x slower than 4, 8.7 GB peak against 4.9; benchmarks/cpu_encode_batch.py).
GPU_ENCODE_BATCH = 64
CPU_ENCODE_BATCH = 4


def default_encode_batch(device: torch.device) -> int:
    return CPU_ENCODE_BATCH if device.type == "cpu" else GPU_ENCODE_BATCH


class Assistant:
    def __init__(
        self,
        model: VessaModel,
        bank: TemplateBank,
        classes: list[ClassInfo] | None = None,
        device: str | torch.device | None = None,
        cache: EmbeddingCache | None = None,
        model_version: str = "untrained",
        encode_batch: int | None = None,
        answer_cache_entries: int = 1024,
        cpu_bf16: bool = False,
        options: InferenceOptions | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)
        self.bank = bank
        self.classes = classes or bank.classes
        self.encoder_id = module_state_hash(self.model.image_encoder)
        bank.check_compatible(self.classes, self.encoder_id)
        self.cache = cache or EmbeddingCache(self.device)
        self.model_version = model_version
        self.encode_batch = encode_batch or default_encode_batch(self.device)
        self.options = options or InferenceOptions()
        self.num_templates = self.options.num_templates or model.config.num_templates
        self.cpu_bf16 = cpu_bf16  # bf16 on the CPU too (assistant_server/precision.py)
        self._bank_state: _BankState | None = None
        self._lock = threading.Lock()
        self._stats = {
            "slices": 0,
            "batches": 0,
            "encoded": 0,
            "encoder_s": 0.0,
            "decoder_s": 0.0,
            "misses": 0,
            "answer_hits": 0,
        }
        # (slice hash, bank version, class ids) -> templates-only SliceOutput; label maps are ~50 KB each
        self._answers: OrderedDict[tuple, SliceOutput] = OrderedDict()
        self.answer_cache_entries = answer_cache_entries

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def from_files(
        cls,
        ckpt: str | Path | None,
        bank_dir: str | Path,
        device: str | None = None,
        encoder: str = "litemedsam",
        cache_device_entries: int = 4096,
        cache_host_entries: int = 16384,
        cache_store: str | Path | None = None,
        encode_batch: int | None = None,
        answer_cache_entries: int = 1024,
        cpu_bf16: bool = False,
        options: dict | None = None,
    ) -> Assistant:
        """ckpt: a checkpoint path; "pretrained" (LiteMedSAM weights, new parts untrained) or "random"
        (random weights: for tests and benchmarks, where speed does not depend on weight values).
        options: InferenceOptions fields overriding the checkpoint's own (`extra["inference"]`)."""
        bank = TemplateBank(bank_dir)
        stored: dict = {}
        if ckpt in (None, "", "pretrained", "random"):
            model = build_model(VessaConfig(encoder=encoder), pretrained=(ckpt != "random"))
            classes, version = bank.classes, f"{encoder}-{ckpt or 'pretrained'}"
        else:
            model, payload = load_checkpoint(ckpt)
            classes = payload["classes"]
            version = f"{Path(ckpt).name}@{payload['step']}:{payload['weight_hashes']['state'][:12]}"
            stored = dict(payload["extra"].get("inference") or {})
        opts = InferenceOptions.from_dict(
            {**stored, **{k: v for k, v in (options or {}).items() if v is not None}}
        )
        device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cache = EmbeddingCache(device_t, cache_device_entries, cache_host_entries, cache_store)
        return cls(
            model, bank, classes, device_t, cache, version, encode_batch, answer_cache_entries, cpu_bf16, opts
        )

    # ------------------------------------------------------------------------------------------ helpers
    def _autocast(self):
        return autocast(self.device, self.cpu_bf16)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bank_state(self) -> _BankState:
        """Template keys and label grids on the device, recomputed when the bank's version changes."""
        self.bank.refresh()
        state = self._bank_state
        if state is not None and state.version == self.bank.version:
            return state
        self.bank.check_compatible(self.classes, self.encoder_id)
        t = self.bank.tensors()
        keys, grids = [], []
        num_classes = len(self.classes)
        with torch.inference_mode(), self._autocast():
            for i in range(0, t["embedding"].shape[0], 64):
                emb = t["embedding"][i : i + 64].to(self.device, torch.float32)
                keys.append(self.model.template_keys(emb).float())
                onehot = F.one_hot(t["label"][i : i + 64].to(self.device).long(), num_classes)
                grids.append(self.model.matcher.label_grid(onehot.permute(0, 3, 1, 2).float()))
        g = self.model.config.grid
        state = _BankState(
            version=self.bank.version,
            keys=torch.cat(keys)
            if keys
            else torch.zeros(0, self.model.config.key_dim, g, g, device=self.device),
            label_grid=torch.cat(grids) if grids else torch.zeros(0, num_classes, g, g, device=self.device),
            descriptors=t["descriptor"].to(self.device),
            text=self.bank.text.to(self.device),
            patients=self.bank.patient_ids(),
            single_component=single_component_classes(t["label"], list(range(1, num_classes)))
            if len(t["label"])
            else [],
            positions=_relative_positions(self.bank).to(self.device),
        )
        self._bank_state = state
        return state

    def _check_class_ids(self, class_ids: list[int] | None) -> list[int]:
        names = {c.index: c.name for c in self.classes}
        if class_ids is None:
            return sorted(i for i in names if i != 0)
        ids = sorted(set(int(c) for c in class_ids))
        if not ids:
            raise AssistantInputError("the class subset is empty")
        unknown = [c for c in ids if c not in names or c == 0]
        if unknown:
            raise AssistantInputError(
                f"unknown class {unknown}: this assistant segments {[(i, n) for i, n in names.items() if i]}"
            )
        return ids

    def class_index(self, name_or_index: str | int) -> int:
        for c in self.classes:
            if str(c.index) == str(name_or_index) or c.name.lower() == str(name_or_index).lower():
                return c.index
        raise AssistantInputError(f"unknown class {name_or_index!r}: known {[c.name for c in self.classes]}")

    # ------------------------------------------------------------------------------------------ encode
    def embeddings(
        self, slices: list[SliceInput]
    ) -> tuple[list[str], list[torch.Tensor | None], list[tuple[int, int] | None]]:
        """Per slice: its hash, its cached or fresh embedding (256, 64, 64) or None on a miss, its size."""
        hashes: list[str] = []
        found: list[torch.Tensor | None] = []
        shapes: list[tuple[int, int] | None] = []
        to_encode: list[int] = []
        for i, s in enumerate(slices):
            if s.image is not None:
                key = s.slice_hash or slice_hash(s.image)
            elif s.slice_hash:
                key = s.slice_hash
            else:
                raise AssistantInputError(f"slice {i} has neither an image nor a hash")
            hashes.append(key)
            entry = self.cache.get(key)
            if entry is None and s.image is not None:
                to_encode.append(i)
                found.append(None)
                shapes.append(tuple(s.image.shape))
            else:
                found.append(entry.embedding if entry else None)
                shapes.append(entry.shape if entry else None)
        if to_encode:
            self._sync()
            t0 = time.perf_counter()
            for start in range(0, len(to_encode), self.encode_batch):
                chunk = to_encode[start : start + self.encode_batch]
                x = encoder_input([slices[i].image for i in chunk], self.device)
                with torch.inference_mode(), self._autocast():
                    emb = self.model.encode(x)
                for j, i in enumerate(chunk):
                    self.cache.put(hashes[i], emb[j], shapes[i])
                    found[i] = emb[j].to(self.cache.dtype)
            self._sync()
            with self._lock:
                self._stats["encoder_s"] += time.perf_counter() - t0
                self._stats["encoded"] += len(to_encode)
        return hashes, found, shapes

    # ------------------------------------------------------------------------------------------ predict
    def predict(
        self,
        slices: list[SliceInput],
        class_ids: list[int] | None = None,
        return_probs: bool = False,
        bank_version: int | None = None,
    ) -> list[SliceOutput]:
        """Pseudo-label a batch of slices; see the module docstring."""
        ids, state = self._checked_request(slices, class_ids, bank_version)
        num_classes = len(self.classes)
        hashes, embs, shapes = self.embeddings(slices)
        outputs: list[SliceOutput | None] = [None] * len(slices)
        for i, e in enumerate(embs):
            if e is None:
                outputs[i] = SliceOutput(status="miss", slice_hash=hashes[i])
        with self._lock:
            self._stats["misses"] += sum(e is None for e in embs)

        # Templates-only slices answered before come from the answer cache (not with probabilities,
        # which are 10x larger and asked for rarely).
        ids_key = tuple(ids)
        remember = not return_probs and self.answer_cache_entries > 0
        if remember:
            with self._lock:
                for i, e in enumerate(embs):
                    if e is None or slices[i].student_probs is not None:
                        continue
                    key = (hashes[i], state.version, ids_key)
                    hit = self._answers.get(key)
                    if hit is not None:
                        self._answers.move_to_end(key)
                        outputs[i] = _copy_output(hit)
                        self._stats["answer_hits"] += 1
        # Slices with and without student prompts go through the decoder as two groups.
        groups = [
            [
                i
                for i, e in enumerate(embs)
                if e is not None and outputs[i] is None and slices[i].student_probs is None
            ],
            [i for i, e in enumerate(embs) if e is not None and slices[i].student_probs is not None],
        ]
        lcc_ids = self._lcc_classes(state, ids)
        self._sync()
        t0 = time.perf_counter()
        for group in groups:
            if not group:
                continue
            emb = torch.stack([embs[i] for i in group])
            student = None
            if slices[group[0]].student_probs is not None:
                student = torch.stack([self._student_map(slices[i].student_probs) for i in group])
            probs, conf = self._decode(emb, state, ids, student)
            for j, i in enumerate(group):
                outputs[i] = self._finish(
                    hashes[i], shapes[i], probs[j], conf[j], ids, num_classes, return_probs, lcc_ids
                )
                if remember and student is None:
                    self._remember((hashes[i], state.version, ids_key), outputs[i])
        self._sync()
        with self._lock:
            self._stats["decoder_s"] += time.perf_counter() - t0
            self._stats["slices"] += len(slices)
            self._stats["batches"] += 1
        return outputs  # type: ignore[return-value]

    def _checked_request(
        self, slices: list[SliceInput], class_ids: list[int] | None, bank_version: int | None = None
    ) -> tuple[list[int], _BankState]:
        """The checks every prediction makes before any work: class subset, pinned bank version, a
        non-empty bank, student maps of shape (C, H, W). Returns the class ids and the bank state."""
        ids = self._check_class_ids(class_ids)
        state = self.bank_state()
        if bank_version is not None and int(bank_version) != state.version:
            raise BankVersionError(
                f"bank version {bank_version} does not exist any more: this assistant serves version {state.version}"
            )
        if len(state.keys) == 0:
            raise AssistantInputError("the template bank is empty: add templates first")
        num_classes = len(self.classes)
        for i, s in enumerate(slices):
            if s.student_probs is not None and (
                s.student_probs.ndim != 3 or s.student_probs.shape[0] != num_classes
            ):
                raise AssistantInputError(
                    f"slice {i}: student probabilities must have shape (C={num_classes}, H, W), got {tuple(s.student_probs.shape)}"
                )
        return ids, state

    def _student_map(self, probs: np.ndarray) -> torch.Tensor:
        """A student's (C, H', W') probabilities → (C, 256, 256) float32 on the device."""
        return resize_probs(torch.as_tensor(np.asarray(probs, np.float32))[None].to(self.device))[0]

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
        for _ in range(self.options.refine_passes if refine else 0):
            prompt = self._as_prompt(probs, ids)
            if w > 0 and len(present) > 1:
                prev = torch.cat([prompt[:1], prompt[:-1]])
                nxt = torch.cat([prompt[1:], prompt[-1:]])
                prompt = (1 - 2 * w) * prompt + w * prev + w * nxt
            prompts = [prompt[j] for j in range(len(present))]
            new_probs, _ = self._volume_pass(emb, state, ids, prompts, positions, exclude)
            probs[refine] = new_probs[refine]  # the confidence stays the first pass's (see _decode)
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
        self._sync()
        with self._lock:
            self._stats["decoder_s"] += time.perf_counter() - t0
            self._stats["slices"] += len(slices)
            self._stats["batches"] += 1
        return outputs  # type: ignore[return-value]

    def _with_volume_templates(
        self,
        state: _BankState,
        emb: torch.Tensor,
        probs: torch.Tensor,
        conf: torch.Tensor,
        positions: torch.Tensor,
        ids: list[int],
    ) -> tuple[_BankState, torch.Tensor]:
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
        state: _BankState,
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

    def _remember(self, key: tuple, out: SliceOutput) -> None:
        with self._lock:
            self._answers[key] = _copy_output(out)
            while len(self._answers) > self.answer_cache_entries:
                self._answers.popitem(last=False)

    def _forward(
        self,
        emb: torch.Tensor,
        state: _BankState,
        ids: list[int],
        positions: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        **prompts,
    ):
        """The model on query embeddings (B, 256, 64, 64) with their top-k templates retrieved
        (positions: (B,) relative positions in their volume, or None); `prompts`: student_probs,
        sparse_prompts, mask_prompt (see VessaModel.forward)."""
        with torch.inference_mode(), self._autocast():
            emb = emb.to(torch.float32) if self.device.type == "cpu" else emb
            idx = self._retrieve(global_descriptor(emb), state, positions, exclude)
            return self.model(
                query_embeddings=emb,
                template_keys=state.keys[idx],
                template_labels=state.label_grid[idx],
                text_embeddings=state.text,
                class_ids=ids,
                **prompts,
            )

    def _decode(
        self, emb: torch.Tensor, state: _BankState, ids: list[int], student: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """emb: (B, 256, 64, 64) → probs (B, 1+M, 256, 256) over background + ids, confidence (B, M).
        Templates-only slices get `options.refine_passes` more passes, each prompted by the last."""
        probs, conf = self._pass(emb, state, ids, student)
        if student is None:
            # The confidence stays the first pass's: with its own answer as the prompt the IoU head sees
            # what looks like a good student mask and rates every refined answer alike (validation
            # volumes: Spearman with true Dice 0.92 for the first pass's confidence, 0.63 for the last's).
            for _ in range(self.options.refine_passes):
                probs, _ = self._pass(emb, state, ids, self._as_prompt(probs, ids))
        return probs, conf

    def _pass(
        self,
        emb: torch.Tensor,
        state: _BankState,
        ids: list[int],
        student: torch.Tensor | None,
        positions: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._forward(emb, state, ids, positions, exclude, student_probs=student)
        return combine_classes(out.logits.float()), out.confidence.float()

    def _as_prompt(self, probs: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """probs (B, 1+M, H, W) over background + ids → a student-style map over all C classes (classes
        not asked for get 0, so they neither prompt nor count as "other" classes)."""
        full = probs.new_zeros(probs.shape[0], len(self.classes), *probs.shape[2:])
        full[:, [0, *ids]] = probs
        return full

    def _lcc_classes(self, state: _BankState, ids: list[int]) -> list[int]:
        mode = self.options.largest_component
        if mode == "on":
            return list(ids)
        if mode == "auto":
            return [c for c in ids if c in state.single_component]
        return []

    def _retrieve(
        self,
        descriptors: torch.Tensor,
        state: _BankState,
        positions: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Top-k templates by descriptor similarity; with a query's relative position in its volume and
        `options.position_weight` > 0, templates from the same part of their own case are preferred;
        `exclude` (B, N) bool: templates a query may not retrieve (itself, as a volume template)."""
        sim = descriptors.float() @ state.descriptors.float().T
        if exclude is not None:
            sim = sim.masked_fill(exclude, float("-inf"))
        w = float(self.options.position_weight)
        if positions is not None and w > 0 and state.positions is not None and len(state.positions):
            sim = sim - w * (positions.float()[:, None] - state.positions.float()[None]).abs()
        k = min(self.num_templates, sim.shape[1])
        idx = sim.topk(k, dim=1).indices
        if k < self.num_templates:
            idx = idx[:, torch.arange(self.num_templates, device=idx.device) % k]
        return idx

    def _finish(
        self,
        key: str,
        shape: tuple[int, int],
        probs: torch.Tensor,
        conf: torch.Tensor,
        ids: list[int],
        num_classes: int,
        return_probs: bool,
        lcc: list[int] | None = None,
    ) -> SliceOutput:
        """probs: (1+M, 256, 256) → the slice's label map at its own size, confidence per class;
        `lcc`: classes cut to their largest connected component."""
        full = restore_size(probs, shape)  # (1+M, H, W)
        arg = full.argmax(dim=0)
        lut = torch.tensor([0, *ids], device=arg.device, dtype=torch.uint8)
        label = lut[arg].cpu().numpy()
        if lcc:
            label = keep_largest(label, lcc, self.options.component_keep_share)
        confidence = np.full(num_classes, math.nan, dtype=np.float32)
        bg = arg == 0
        confidence[0] = float(full[0][bg].mean()) if bool(bg.any()) else 0.0
        confidence[ids] = conf.cpu().numpy()
        out_probs = None
        if return_probs:
            out_probs = np.zeros((num_classes, *shape), dtype=np.float16)
            out_probs[[0, *ids]] = full.cpu().numpy().astype(np.float16)
        return SliceOutput(status="ok", slice_hash=key, label=label, confidence=confidence, probs=out_probs)

    # ------------------------------------------------------------------------------------------ segment
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

    # ------------------------------------------------------------------------------------------ stats
    def stats(self) -> dict:
        with self._lock:
            s = dict(self._stats)
        s["cache"] = self.cache.stats()
        s["bank_version"] = self.bank.version
        s["device"] = str(self.device)
        s["model_version"] = self.model_version
        return s

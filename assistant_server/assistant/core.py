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

import math
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from assistant_server.assistant.answer_cache import AnswerCache
from assistant_server.assistant.bank_state import BankState, compute_bank_state
from assistant_server.assistant.options import InferenceOptions
from assistant_server.assistant.prompted import PromptedSegmentation
from assistant_server.assistant.types import AssistantInputError, BankVersionError, SliceInput, SliceOutput
from assistant_server.assistant.volumes import VolumePrediction
from assistant_server.bank import TemplateBank, global_descriptor
from assistant_server.checkpoint import build_model, load_checkpoint
from assistant_server.embedding_cache import EmbeddingCache
from assistant_server.engines import DecodeFn, EncodeFn, engine_name, select_encoder, select_mask_decoder
from assistant_server.modeling.foundation import module_state_hash
from assistant_server.modeling.vessa import VessaConfig, VessaModel, combine_classes
from assistant_server.precision import autocast
from assistant_server.preprocess import encoder_input, resize_probs, restore_size
from shared.components import keep_largest
from shared.data.types import ClassInfo
from shared.hashing import slice_hash

# Slices per encoder (and decoder) call. On a CPU a large batch is slower per slice and its activations
# take gigabytes (16 slices: 1.5x slower than 4, 8.7 GB peak against 4.9; benchmarks/cpu_encode_batch.py).
GPU_ENCODE_BATCH = 64
CPU_ENCODE_BATCH = 4
# Slices per decoder call in `predict`: the matcher's attention takes B × 1,024 × N·1,024 floats, so one
# call of 8,192 slices asked for 64 GiB on an H200 (docs/gpu.md, perf 2026-12-04); 256 take 2 GiB.
DECODE_CHUNK = 256


def default_encode_batch(device: torch.device) -> int:
    return CPU_ENCODE_BATCH if device.type == "cpu" else GPU_ENCODE_BATCH


class Assistant(VolumePrediction, PromptedSegmentation):
    """Slices (image and/or content hash, optional student probabilities) + class subset → per slice:
    label map, per-class confidence, optionally probabilities; `predict_volume` (volumes.py) for a volume."""

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
        encode_fn: EncodeFn | None = None,
        decode_fn: DecodeFn | None = None,
    ):
        """encode_fn: what computes image embeddings in place of `model.encode` (an engine from
        assistant_server.engines; `from_files` chooses one); None: `model.encode`. decode_fn: likewise
        for SAM's mask decoder (VessaModel.forward's `mask_decoder_fn`); None: the PyTorch module."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)
        self.bank = bank
        self.classes = classes or bank.classes
        self.encoder_id = module_state_hash(self.model.image_encoder)
        bank.check_compatible(self.classes, self.encoder_id)
        reworded = bank.differing_texts(self.classes) if classes is not None else []
        if reworded:
            warnings.warn(
                f"template bank {bank.root}: the texts of classes {reworded} differ from those the checkpoint "
                "was trained with (its text tokens read the bank's embeddings): rebuild the bank from the "
                "training data or retrain Stage-1 on this bank",
                stacklevel=2,
            )
        self.cache = cache or EmbeddingCache(self.device)
        self.model_version = model_version
        self.encode_batch = encode_batch or default_encode_batch(self.device)
        self.options = options or InferenceOptions()
        self.num_templates = self.options.num_templates or model.config.num_templates
        self.cpu_bf16 = cpu_bf16  # bf16 on the CPU too (assistant_server/precision.py)
        self.encode_fn: EncodeFn = encode_fn or self.model.encode
        self.decode_fn: DecodeFn | None = decode_fn
        self._bank_state: BankState | None = None
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
        self._answers = AnswerCache(answer_cache_entries)

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
        engine: str = "auto",
        engine_precision: str = "f32",
        engine_cache: str | Path | None = None,
        decoder_precision: str | None = None,
    ) -> Assistant:
        """ckpt: a checkpoint path; "pretrained" (LiteMedSAM weights, new parts untrained) or "random"
        (random weights: for tests and benchmarks, where speed does not depend on weight values).
        options: InferenceOptions fields overriding the checkpoint's own (`extra["inference"]`).
        engine: auto | torch | openvino, the runtime of the frozen encoder and the mask decoder
        (assistant_server/engines: auto is OpenVINO on a CPU, PyTorch on a GPU; a failing engine falls back
        to PyTorch with one warning); engine_precision: f32 | bf16 | auto (auto: bf16 where the CPU has it
        natively; the default f32 gives the eager path's labels, docs/benchmarks.md); decoder_precision:
        the decoder's, if not the encoder's; engine_cache: the converted models' directory (default
        VESSA_ENGINE_CACHE or ~/.cache/vessa/engines)."""
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
        batch = encode_batch or default_encode_batch(device_t)
        encode_fn = select_encoder(model, device_t, engine, batch, engine_precision, engine_cache)
        decode_fn = select_mask_decoder(
            model, device_t, engine, decoder_precision or engine_precision, engine_cache
        )
        return cls(
            model,
            bank,
            classes,
            device_t,
            cache,
            version,
            encode_batch,
            answer_cache_entries,
            cpu_bf16,
            opts,
            encode_fn=encode_fn,
            decode_fn=decode_fn,
        )

    # ------------------------------------------------------------------------------------------ helpers
    def _autocast(self):
        return autocast(self.device, self.cpu_bf16)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bank_state(self) -> BankState:
        """Template keys and label grids on the device, recomputed when the bank's version changes."""
        self.bank.refresh()
        state = self._bank_state
        if state is not None and state.version == self.bank.version:
            return state
        self.bank.check_compatible(self.classes, self.encoder_id)
        state = compute_bank_state(self.model, self.bank, len(self.classes), self.device, self._autocast)
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
                    emb = self.encode_fn(x)
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
        remember = not return_probs and self._answers.enabled
        if remember:
            hits = 0
            for i, e in enumerate(embs):
                if e is None or slices[i].student_probs is not None:
                    continue
                outputs[i] = self._answers.get((hashes[i], state.version, ids_key))
                hits += outputs[i] is not None
            with self._lock:
                self._stats["answer_hits"] += hits
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
            for start in range(0, len(group), DECODE_CHUNK):
                chunk = group[start : start + DECODE_CHUNK]
                emb = torch.stack([embs[i] for i in chunk])
                student = None
                if slices[chunk[0]].student_probs is not None:
                    student = torch.stack([self._student_map(slices[i].student_probs) for i in chunk])
                probs, conf = self._decode(emb, state, ids, student)
                for j, i in enumerate(chunk):
                    outputs[i] = self._finish(
                        hashes[i], shapes[i], probs[j], conf[j], ids, num_classes, return_probs, lcc_ids
                    )
                    if remember and student is None:
                        self._answers.put((hashes[i], state.version, ids_key), outputs[i])
        self._count_batch(t0, len(slices))
        return outputs  # type: ignore[return-value]

    def _count_batch(self, t0: float, slices: int) -> None:
        """One answered batch in the stats: decoder time since `t0` (after the device finished)."""
        self._sync()
        with self._lock:
            self._stats["decoder_s"] += time.perf_counter() - t0
            self._stats["slices"] += slices
            self._stats["batches"] += 1

    def _checked_request(
        self, slices: list[SliceInput], class_ids: list[int] | None, bank_version: int | None = None
    ) -> tuple[list[int], BankState]:
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

    def _forward(
        self,
        emb: torch.Tensor,
        state: BankState,
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
                mask_decoder_fn=self.decode_fn,
                **prompts,
            )

    def _decode(
        self, emb: torch.Tensor, state: BankState, ids: list[int], student: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """emb: (B, 256, 64, 64) → probs (B, 1+M, 256, 256) over background + ids, confidence (B, M).
        Templates-only slices get `options.refine_passes` more passes, each prompted by the last."""
        probs, conf = self._pass(emb, state, ids, student)
        if student is None:
            # The confidence stays the first pass's: with its own answer as the prompt the IoU head sees
            # what looks like a good student mask and rates every refined answer alike (validation
            # volumes: Spearman with true Dice 0.92 for the first pass's confidence, 0.63 for the last's).
            rows = self._needs_refinement(conf)
            for _ in range(self.options.refine_passes if len(rows) else 0):
                new_probs, _ = self._pass(emb[rows], state, ids, self._as_prompt(probs[rows], ids))
                probs[rows] = new_probs
        return probs, conf

    def _needs_refinement(self, conf: torch.Tensor) -> torch.Tensor:
        """Indices of the slices (conf: (B, M) first-pass confidence) that get refinement passes: all,
        or with `options.refine_below`, those whose least confident requested class is below it."""
        if self.options.refine_below is None:
            return torch.arange(len(conf), device=conf.device)
        return torch.nonzero(conf.amin(1) < float(self.options.refine_below)).flatten()

    def _pass(
        self,
        emb: torch.Tensor,
        state: BankState,
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

    def _lcc_classes(self, state: BankState, ids: list[int]) -> list[int]:
        mode = self.options.largest_component
        if mode == "on":
            return list(ids)
        if mode == "auto":
            return [c for c in ids if c in state.single_component]
        return []

    def _retrieve(
        self,
        descriptors: torch.Tensor,
        state: BankState,
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

    # ------------------------------------------------------------------------------------------ stats
    def stats(self) -> dict:
        with self._lock:
            s = dict(self._stats)
        s["cache"] = self.cache.stats()
        s["bank_version"] = self.bank.version
        s["device"] = str(self.device)
        s["model_version"] = self.model_version
        s["encoder_engine"] = engine_name(self.encode_fn)
        s["decoder_engine"] = engine_name(self.decode_fn)
        return s

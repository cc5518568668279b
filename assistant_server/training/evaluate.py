"""`vessa assistant eval`: the assistant on 3D validation volumes, in two prompting modes, against baselines.

Modes (each slice at its own size; metrics per 3D volume and class, see shared.metrics):
  templates        the assistant prompted by its templates alone
  noisy_student    templates + a simulated noisy student mask as the dense prompt (fixed seed)
Reference rows:
  student_input    the simulated noisy student mask itself (what the assistant was given)
  litemedsam_box   LiteMedSAM as shipped, no training: per class, a box from the nearest template's label
  label_transfer   template label transfer alone (the matcher's prior, no decoder)
  template_copy    plain label transfer: the label map of the most similar template, resized (nothing learned)
Embeddings are computed once per slice and shared by every mode (and persisted with --embed-store).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from assistant_server.assistant import Assistant, SliceInput
from assistant_server.bank import global_descriptor
from assistant_server.bank_builder import resize_label
from assistant_server.checkpoint import read_checkpoint
from assistant_server.modeling.foundation import IMAGE_SIZE, build_foundation, load_foundation_weights
from assistant_server.modeling.structured_prompts import boxes_from_masks
from assistant_server.modeling.vessa import combine_classes
from assistant_server.preprocess import restore_size
from assistant_server.training.simulated_student import simulate_student
from shared.config import VessaSettings, save_resolved

MODES = ("templates", "noisy_student", "student_input", "litemedsam_box", "label_transfer", "template_copy")


class EvalSettings(VessaSettings):
    ckpt: str
    data: Path
    split: str = "val"
    bank: Path | None = None
    out: Path | None = None
    device: str | None = None
    limit: int | None = None
    seed: int = 0
    embed_store: Path | None = None
    modes: tuple[str, ...] = MODES
    # InferenceOptions overrides (None: the checkpoint's own, as a replica would serve it)
    refine_passes: int | None = None
    volume_context: float | None = None
    largest_component: str | None = None
    component_keep_share: float | None = None
    num_templates: int | None = None
    position_weight: float | None = None
    volume_templates: int | None = None
    cpu_bf16: bool = False
    refine_below: float | None = None
    engine: Literal["auto", "torch", "openvino"] = "auto"  # encoder and decoder runtime (assistant_server/engines)
    engine_precision: Literal["auto", "f32", "bf16"] = "f32"  # f32: the eager path's labels; bf16 where native is faster
    decoder_precision: Literal["auto", "f32", "bf16"] | None = None  # None: engine_precision

    def inference_overrides(self) -> dict:
        return {
            "refine_passes": self.refine_passes,
            "volume_context": self.volume_context,
            "largest_component": self.largest_component,
            "component_keep_share": self.component_keep_share,
            "num_templates": self.num_templates,
            "position_weight": self.position_weight,
            "volume_templates": self.volume_templates,
            "refine_below": self.refine_below,
        }


def _bank_for(s: EvalSettings) -> Path:
    if s.bank is not None:
        return s.bank
    if s.ckpt in ("pretrained", "random"):
        raise ValueError("--bank is required with an untrained assistant")
    return Path(read_checkpoint(s.ckpt)["train_config"]["bank_path"])


class _Baselines:
    """LiteMedSAM as shipped (for the box baseline) next to the assistant being evaluated."""

    def __init__(self, assistant: Assistant):
        self.a = assistant
        self.lms = build_foundation()
        load_foundation_weights(self.lms)
        self.lms.to(assistant.device).eval()

    @torch.inference_mode()
    def litemedsam_box(self, emb: torch.Tensor, idx: torch.Tensor, num_classes: int) -> torch.Tensor:
        """emb (B, 256, 64, 64), nearest template idx (B,) → probs (B, C, 256, 256)."""
        labels = self.a.bank.tensors()["label"].to(emb.device)[idx].long()  # (B, 256, 256)
        b = emb.shape[0]
        logits = torch.full((b, num_classes - 1, IMAGE_SIZE, IMAGE_SIZE), -20.0, device=emb.device)
        pe = self.lms.prompt_encoder.get_dense_pe()
        for c in range(1, num_classes):
            boxes, valid = boxes_from_masks(labels == c)
            if not valid.any():
                continue
            sparse, dense = self.lms.prompt_encoder(points=None, boxes=boxes[valid][:, None], masks=None)
            masks, _ = self.lms.mask_decoder(emb[valid].float(), pe, sparse, dense, multimask_output=False)
            logits[valid, c - 1] = masks[:, 0].float()
        return combine_classes(logits)

    @torch.inference_mode()
    def label_transfer(self, emb: torch.Tensor, idx_k: torch.Tensor) -> torch.Tensor:
        """emb (B, 256, 64, 64), templates idx (B, K) → the matcher's prior (B, C, 256, 256)."""
        st = self.a.bank_state()
        m = self.a.model
        match = m.matcher(m.matcher.keys(emb.float()), st.keys[idx_k], st.label_grid[idx_k])
        return F.interpolate(match.prior, size=IMAGE_SIZE, mode="bilinear", align_corners=False)


def evaluate_assistant(s: EvalSettings) -> dict:
    from assistant_server.cpu_memory import keep_freed_memory
    from shared.data import open_dataset
    from shared.metrics import comparison_table, evaluate_volume, summarise

    bank_dir = _bank_for(s)
    assistant = Assistant.from_files(
        s.ckpt,
        bank_dir,
        device=s.device,
        cache_store=s.embed_store,
        cache_device_entries=100_000,
        options=s.inference_overrides(),
        cpu_bf16=s.cpu_bf16,
        engine=s.engine,
        engine_precision=s.engine_precision,
        decoder_precision=s.decoder_precision,
    )
    keep_freed_memory(assistant.device)  # a long batch job: on the CPU, reuse freed blocks
    baselines = _Baselines(assistant)
    ds = open_dataset(s.data)
    num_classes = len(assistant.classes)
    ids = ds.volume_ids(s.split)[: s.limit] if s.limit else ds.volume_ids(s.split)
    if not ids:
        raise ValueError(f"{s.data} has no '{s.split}' volumes")
    gen = torch.Generator().manual_seed(s.seed)
    per_mode: dict[str, list[dict]] = {m: [] for m in s.modes}
    conf: dict[str, list[dict]] = {m: [] for m in ("templates", "noisy_student") if m in s.modes}
    t0 = time.perf_counter()
    for cid in tqdm(ids, desc=f"eval {s.split}", unit="volume"):
        vol = ds.read_volume(cid, s.split)
        slices = [SliceInput(image=np.ascontiguousarray(vol.image[z])) for z in range(vol.image.shape[0])]
        shape = vol.image.shape[1:]
        preds = {m: np.zeros(vol.image.shape, dtype=np.uint8) for m in s.modes}
        # Simulated student from the 256×256 label (the same noise for every mode that uses it).
        lab256 = torch.stack([resize_label(vol.label[z]) for z in range(vol.label.shape[0])]).long()
        student = simulate_student(lab256, num_classes, gen).numpy()
        if "templates" in s.modes:
            outs = assistant.predict_volume(slices)
            for z, o in enumerate(outs):
                preds["templates"][z] = o.label
            conf["templates"].append(volume_confidence(outs, assistant.classes))
        if "noisy_student" in s.modes:
            prompted = [SliceInput(image=sl.image, student_probs=student[z]) for z, sl in enumerate(slices)]
            outs = assistant.predict_volume(prompted)
            for z, o in enumerate(outs):
                preds["noisy_student"][z] = o.label
            conf["noisy_student"].append(volume_confidence(outs, assistant.classes))
        if "student_input" in s.modes:
            for z in range(len(slices)):
                preds["student_input"][z] = _argmax_back(torch.as_tensor(student[z]), shape)
        if {"litemedsam_box", "label_transfer", "template_copy"} & set(s.modes):
            _, embs, _ = assistant.embeddings(slices)
            emb = torch.stack(embs).to(assistant.device).float()
            idx_k = assistant._retrieve(global_descriptor(emb), assistant.bank_state())
            if "litemedsam_box" in s.modes:
                probs = baselines.litemedsam_box(emb, idx_k[:, 0], num_classes)
                for z in range(len(slices)):
                    preds["litemedsam_box"][z] = _argmax_back(probs[z], shape)
            if "label_transfer" in s.modes:
                probs = baselines.label_transfer(emb, idx_k)
                for z in range(len(slices)):
                    preds["label_transfer"][z] = _argmax_back(probs[z], shape)
            if "template_copy" in s.modes:
                nearest = assistant.bank.tensors()["label"][idx_k[:, 0].cpu()].long()  # (Z, 256, 256)
                onehot = F.one_hot(nearest, num_classes).permute(0, 3, 1, 2).float()
                for z in range(len(slices)):
                    preds["template_copy"][z] = _argmax_back(onehot[z], shape)
        for m in s.modes:
            per_mode[m].append(evaluate_volume(preds[m], vol.label, assistant.classes, vol.spacing, case_id=cid))
            if m in conf:
                per_mode[m][-1]["confidence"] = conf[m][-1]
    summary = {m: summarise(per_mode[m]) for m in s.modes}
    table = comparison_table(summary)
    ranking = {m: confidence_ranking(per_mode[m]) for m in conf}
    report = {
        "ckpt": s.ckpt,
        "bank": str(bank_dir),
        "bank_version": assistant.bank.version,
        "data": str(s.data),
        "split": s.split,
        "volumes": len(ids),
        "seconds": time.perf_counter() - t0,
        "assistant_stats": assistant.stats(),
        "inference_options": assistant.options.to_dict(),
        "summary": summary,
        "ranking": ranking,
        "per_volume": per_mode,
        "table": table,
    }
    if s.out:
        Path(s.out).mkdir(parents=True, exist_ok=True)
        (Path(s.out) / "metrics.json").write_text(json.dumps(report, indent=1, default=float))
        save_resolved(s, s.out)
    return report


def volume_confidence(outs: list, classes) -> dict:
    """A volume's confidence from its slices' answers: per class, the mean predicted IoU over the slices
    where the class was predicted (NaN where it never was); `mean` over the classes that were."""
    per_class = {}
    for c in classes:
        if c.index == 0:
            continue
        vals = [float(o.confidence[c.index]) for o in outs if o.status == "ok" and (o.label == c.index).any()]
        per_class[c.name] = float(np.mean(vals)) if vals else float("nan")
    finite = [v for v in per_class.values() if np.isfinite(v)]
    return {"classes": per_class, "mean": float(np.mean(finite)) if finite else float("nan")}


def confidence_ranking(per_volume: list[dict]) -> dict:
    """Spearman between each volume's confidence and its true mean Dice (and per class), and the
    reliability table (equal-count confidence bins vs mean true Dice)."""
    from shared.calibration import reliability_table, spearman

    conf = [v["confidence"]["mean"] for v in per_volume]
    dice = [float(np.mean([m["dice"] for m in v["classes"].values()])) * 100 for v in per_volume]
    per_class = {}
    for name in per_volume[0]["classes"] if per_volume else []:
        per_class[name] = spearman(
            [v["confidence"]["classes"][name] for v in per_volume],
            [v["classes"][name]["dice"] for v in per_volume],
        )
    return {
        "spearman": spearman(conf, dice),
        "spearman_per_class": per_class,
        "reliability": reliability_table(conf, dice, bins=4),
    }


def _argmax_back(probs: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """(C, 256, 256) probabilities → (H, W) uint8 label map at the slice's own size."""
    return restore_size(probs.float(), tuple(shape)).argmax(0).to(torch.uint8).cpu().numpy()


def embed_dataset(
    data: str | Path, store: str | Path, device: str | None = None, batch_size: int = 8, engine: str = "auto"
) -> int:
    """Embed every canonical training slice (as the trainer sends it) into a persistent store (engine:
    the encoder's runtime; on a CPU, OpenVINO at f32 unless "torch")."""
    from assistant_server.checkpoint import build_model
    from assistant_server.embedding_cache import EmbeddingCache
    from assistant_server.engines import stored_embeddings_encoder
    from assistant_server.modeling.vessa import VessaConfig
    from assistant_server.preprocess import encoder_input
    from shared.data import open_dataset
    from shared.hashing import slice_hash
    from shared.wire.canonical import canonical_slices

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(VessaConfig(), pretrained=True).to(dev).eval()
    encode = stored_embeddings_encoder(model, dev, engine)
    cache = EmbeddingCache(dev, device_entries=batch_size, store_dir=store)
    ds = open_dataset(data)
    refs = ds.slice_refs()
    done = 0
    for start in tqdm(range(0, len(refs), batch_size), desc="embedding slices", unit="batch"):
        chunk = refs[start : start + batch_size]
        canon = canonical_slices([ds.read_unlabeled(r).image for r in chunk])
        keys = [slice_hash(c) for c in canon]
        todo = [i for i, k in enumerate(keys) if not cache.contains(k)]
        if todo:
            with torch.inference_mode():
                emb = encode(encoder_input(canon[todo], dev))
            for j, i in enumerate(todo):
                cache.put(keys[i], emb[j], canon[i].shape)
        done += len(chunk)
    return done

"""Building a template bank from the labeled cases of a dataset, and adding single exemplars."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from assistant_server.bank import Exemplar, TemplateBank
from assistant_server.checkpoint import build_model, load_checkpoint
from assistant_server.cpu_memory import keep_freed_memory
from assistant_server.engines import EncodeFn, stored_embeddings_encoder
from assistant_server.modeling.foundation import IMAGE_SIZE, module_state_hash
from assistant_server.modeling.vessa import VessaConfig, VessaModel
from assistant_server.precision import autocast
from assistant_server.preprocess import encoder_input
from assistant_server.text_embedding import TEXT_MODEL_NAME, embed_classes
from shared.data.resize import resize_label as resize_label_np
from shared.data.types import ClassInfo


def exemplar_id(case_id: str, slice_index: int) -> str:
    """A file-safe exemplar id from a case id and slice index."""
    return (re.sub(r"[^A-Za-z0-9_-]", "_", case_id)[:48] + f"_s{slice_index}")[:64]


def resize_label(label: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(H, W) integer label map → (size, size) uint8 tensor (the data layer's centre-aligned nearest)."""
    return torch.from_numpy(resize_label_np(np.asarray(label), (size, size)).astype(np.uint8))


def encoder_for(encoder: str = "litemedsam", ckpt: str | Path | None = None, seed: int = 0) -> VessaModel:
    """The model whose (frozen) encoder a bank is built with: from a checkpoint or freshly built."""
    if ckpt:
        return load_checkpoint(ckpt)[0]
    return build_model(VessaConfig(encoder=encoder), pretrained=(encoder == "litemedsam"), seed=seed)


@torch.inference_mode()
def encode_exemplars(
    model: VessaModel,
    images: list[np.ndarray],
    device: torch.device,
    cpu_bf16: bool = False,
    encode_fn: EncodeFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) images → (N, 256, 256) encoder-normalised images and (N, 256, 64, 64) embeddings (CPU).
    cpu_bf16: bf16 autocast on the CPU too (assistant_server/precision.py); encode_fn: an engine in
    place of `model.encode` (assistant_server/engines.stored_embeddings_encoder)."""
    x = encoder_input(images, device)
    with autocast(device, cpu_bf16):
        emb = (encode_fn or model.encode)(x)
    return x[:, 0].cpu(), emb.float().cpu()


def build_bank(
    data: str | Path,
    n_labeled: int,
    out: str | Path,
    encoder: str = "litemedsam",
    ckpt: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 8,
    classes: list[ClassInfo] | None = None,
    cpu_bf16: bool = False,
    engine: str = "auto",
) -> TemplateBank:
    """Every slice of the first `n_labeled` patients of `data` becomes an exemplar. engine: the
    encoder's runtime (assistant_server/engines; on a CPU, OpenVINO at f32 unless "torch")."""
    from shared.data import open_dataset
    from shared.data.split import split_by_patient

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    keep_freed_memory(dev)  # a long batch job: on the CPU, reuse freed blocks instead of faulting them in
    ds = open_dataset(data)
    split = split_by_patient(ds, n_labeled)
    model = encoder_for(encoder, ckpt).to(dev).eval()
    encode_fn = stored_embeddings_encoder(model, dev, engine)
    classes = classes or ds.classes
    bank = TemplateBank.create(
        out, classes, embed_classes(classes), module_state_hash(model.image_encoder), TEXT_MODEL_NAME
    )
    pool = split.labeled
    all_ex, all_img, all_lab, all_emb = [], [], [], []
    bar = tqdm(total=len(pool), desc="bank: encoding exemplars", unit="slice")
    for start in range(0, len(pool), batch_size):
        items = [pool[i] for i in range(start, min(start + batch_size, len(pool)))]
        images, emb = encode_exemplars(model, [it.image for it in items], dev, cpu_bf16, encode_fn)
        labels = torch.stack([resize_label(it.label) for it in items])
        exemplars = [
            Exemplar(
                id=exemplar_id(it.ref.case_id, it.ref.slice_index),
                case_id=it.ref.case_id,
                patient_id=it.ref.patient_id,
                slice_index=int(it.ref.slice_index),
                source=str(Path(data).name),
                height=int(it.image.shape[0]),
                width=int(it.image.shape[1]),
            )
            for it in items
        ]
        all_ex += exemplars
        all_img.append(images)
        all_lab.append(labels)
        all_emb.append(emb)
        bar.update(len(items))
    bar.close()
    # One commit: the bank's first version holds every exemplar.
    bank.add(all_ex, torch.cat(all_img), torch.cat(all_lab), torch.cat(all_emb))
    return bank

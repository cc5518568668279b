"""A pseudo-labeled bank: the assistant's own confident answers on unlabeled volumes, for self-training.

    vessa assistant pseudo-bank --ckpt TEACHER.pt --data DIR --labeled N --out DIR

The teacher (a Stage-1 checkpoint) labels whole unlabeled training volumes as it would serve them
(refinement, volume context, 3D cleaning); per volume, the slices it is most confident about (a share
`keep` of the slices where it predicts any class, ranked by the mean predicted IoU of the classes it
predicts) become exemplars of a new bank, with the teacher's label maps as their labels. Stage-1
(`pseudo_bank`, `p_pseudo`) then draws some of its queries from that bank, while their templates still
come from the real labeled bank: the assistant sees many more patients' anatomy than the few labeled.

Unlabeled slices come from the protocol split's `UnlabeledPool`, whose only reader is
`ds.read_unlabeled`: no label of an unlabeled case is reachable from here.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from tqdm import tqdm

from assistant_server.assistant import Assistant, SliceInput, SliceOutput
from assistant_server.bank import Exemplar, TemplateBank
from assistant_server.bank_builder import exemplar_id, resize_label
from assistant_server.cpu_memory import keep_freed_memory
from assistant_server.preprocess import encoder_input
from shared.config import VessaSettings, save_resolved
from shared.data.split import UnlabeledPool

PSEUDO_SOURCE = "pseudo"


class PseudoBankSettings(VessaSettings):
    """`vessa assistant pseudo-bank` settings (YAML keys, `VESSA_` env vars, or flags)."""

    ckpt: Path = Field(description="the teacher: a Stage-1 checkpoint")
    data: Path = Field(description="the dataset whose unlabeled training volumes are labeled")
    labeled: int = Field(ge=1, description="labeled patients (the first N): all others are unlabeled")
    out: Path = Field(description="the pseudo-labeled bank to create")
    bank: Path | None = Field(None, description="the teacher's template bank (default: its training bank)")
    patients: int = Field(16, ge=1, description="unlabeled patients to label, spread over the protocol order")
    keep: float = Field(0.5, gt=0.0, le=1.0, description="share of each volume's foreground slices kept")
    holdout_patients: int = Field(
        0, ge=0, description="leave out the last K patients of the order (`vessa data holdout --patients K`)"
    )
    device: str | None = None
    embed_store: Path | None = None


def pick_patients(patients: tuple[str, ...] | list[str], n: int) -> list[str]:
    """n patients spread evenly over the protocol order (all of them when n ≥ their number)."""
    if n >= len(patients):
        return list(patients)
    step = len(patients) / n
    return [patients[int(i * step)] for i in range(n)]


def unlabeled_volumes(pool: UnlabeledPool, patients: list[str]) -> dict[str, list[int]]:
    """case id → the pool indices of its slices in slice order, for the given patients' cases."""
    wanted = set(patients)
    cases: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for i, ref in enumerate(pool.refs):
        if ref.patient_id in wanted:
            cases[ref.case_id].append((int(ref.slice_index), i))
    return {cid: [i for _, i in sorted(v)] for cid, v in sorted(cases.items())}


def slice_confidence(out: SliceOutput) -> float:
    """The mean predicted IoU over the classes the slice's label map shows; NaN when it shows none."""
    if out.status != "ok" or out.label is None:
        return float("nan")
    shown = [int(c) for c in np.unique(out.label) if c > 0]
    if not shown:
        return float("nan")
    return float(np.mean([out.confidence[c] for c in shown]))


def select_confident(confidences: list[float], keep: float) -> list[int]:
    """Indices of the `keep` share (at least one) of the finite confidences, most confident first."""
    finite = [i for i, c in enumerate(confidences) if np.isfinite(c)]
    if not finite:
        return []
    n = max(1, round(keep * len(finite)))
    return sorted(finite, key=lambda i: -confidences[i])[:n]


def build_pseudo_bank(s: PseudoBankSettings) -> TemplateBank:
    """Label `s.patients` unlabeled patients' volumes with the teacher; keep the confident slices."""
    from assistant_server.checkpoint import read_checkpoint
    from shared.data import open_dataset
    from shared.data.split import split_by_patient

    bank_dir = s.bank or Path(read_checkpoint(s.ckpt)["train_config"]["bank_path"])
    assistant = Assistant.from_files(s.ckpt, bank_dir, device=s.device, cache_store=s.embed_store)
    keep_freed_memory(assistant.device)
    split = split_by_patient(open_dataset(s.data), s.labeled)
    pool = split.unlabeled  # images only: the pool cannot read a label
    candidates = split.unlabeled_patients
    if s.holdout_patients:
        candidates = candidates[: -s.holdout_patients]  # kept unseen, even transductively
    if not candidates:
        raise ValueError(f"no unlabeled patients left after leaving out the last {s.holdout_patients}")
    chosen = pick_patients(candidates, s.patients)
    volumes = unlabeled_volumes(pool, chosen)
    teacher = assistant.bank
    out = TemplateBank.create(
        s.out, teacher.classes, teacher.text.numpy(), teacher.encoder_id, teacher.manifest["text_model"]
    )
    save_resolved(s, s.out, name="pseudo_bank.resolved.yaml")
    exemplars, images, labels, embs, report = [], [], [], [], []
    for cid, idx in tqdm(volumes.items(), desc="pseudo-labeling volumes", unit="volume"):
        items = [pool[i] for i in idx]
        slices = [SliceInput(image=np.ascontiguousarray(it.image)) for it in items]
        outs = assistant.predict_volume(slices)
        conf = [slice_confidence(o) for o in outs]
        kept = select_confident(conf, s.keep)
        _, volume_embs, _ = assistant.embeddings([slices[j] for j in kept])
        for j, emb in zip(kept, volume_embs):
            it = items[j]
            exemplars.append(
                Exemplar(
                    id=exemplar_id(it.ref.case_id, it.ref.slice_index),
                    case_id=it.ref.case_id,
                    patient_id=it.ref.patient_id,
                    slice_index=int(it.ref.slice_index),
                    source=PSEUDO_SOURCE,
                    height=int(it.image.shape[0]),
                    width=int(it.image.shape[1]),
                )
            )
            # float16, as the bank stores them: a few hundred exemplars stay well under a gigabyte
            images.append(encoder_input([it.image], "cpu")[0, 0].to(torch.float16))
            labels.append(resize_label(outs[j].label))
            embs.append(emb.to("cpu", torch.float16))
        report.append(
            {
                "case_id": cid,
                "slices": len(items),
                "kept": [int(items[j].ref.slice_index) for j in kept],
                "confidence": [None if not np.isfinite(c) else round(c, 4) for c in conf],
            }
        )
    if exemplars:
        out.add(exemplars, torch.stack(images), torch.stack(labels), torch.stack(embs))
    (Path(s.out) / "pseudo_labels.json").write_text(
        json.dumps(
            {
                "teacher": str(s.ckpt),
                "teacher_version": assistant.model_version,
                "patients": chosen,
                "volumes": report,
            },
            indent=1,
        )
    )
    return out

"""The bank as the assistant uses it: template keys, label grids and descriptors on the device, per
bank version (`Assistant.bank_state` recomputes it when the version changes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from assistant_server.bank import TemplateBank
from assistant_server.modeling.vessa import VessaModel
from shared.components import single_component_classes


@dataclass
class BankState:
    version: int
    keys: torch.Tensor  # (N, D, G, G)
    label_grid: torch.Tensor  # (N, C, G, G)
    descriptors: torch.Tensor  # (N, 4096)
    text: torch.Tensor  # (C, 384)
    patients: list[str] = field(default_factory=list)
    single_component: list[int] = field(default_factory=list)  # classes whose exemplars are one blob
    positions: torch.Tensor | None = None  # (N,) each exemplar's relative position in its case, 0..1


def relative_positions(bank: TemplateBank) -> torch.Tensor:
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


def compute_bank_state(
    model: VessaModel, bank: TemplateBank, num_classes: int, device: torch.device, autocast: Callable[[], Any]
) -> BankState:
    """The bank's current version on `device`: template keys and label grids in chunks of 64 exemplars."""
    t = bank.tensors()
    keys, grids = [], []
    with torch.inference_mode(), autocast():
        for i in range(0, t["embedding"].shape[0], 64):
            emb = t["embedding"][i : i + 64].to(device, torch.float32)
            keys.append(model.template_keys(emb).float())
            onehot = F.one_hot(t["label"][i : i + 64].to(device).long(), num_classes)
            grids.append(model.matcher.label_grid(onehot.permute(0, 3, 1, 2).float()))
    g = model.config.grid
    return BankState(
        version=bank.version,
        keys=torch.cat(keys)
        if keys
        else torch.zeros(0, model.config.key_dim, g, g, device=device),
        label_grid=torch.cat(grids) if grids else torch.zeros(0, num_classes, g, g, device=device),
        descriptors=t["descriptor"].to(device),
        text=bank.text.to(device),
        patients=bank.patient_ids(),
        single_component=single_component_classes(t["label"], list(range(1, num_classes)))
        if len(t["label"])
        else [],
        positions=relative_positions(bank).to(device),
    )

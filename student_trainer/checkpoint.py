"""Checkpoints: plain dicts of tensors and simple Python values, loadable with
`torch.load(path, weights_only=True)`; the resolved config rides along as a JSON string and is also
written next to the file as YAML (`shared.config.save_resolved`).

Keys: `format` (int), `kind` ("vessa-student"), `model` (student state dict), `model_meta` (in_channels,
num_classes, image_size, upsampling), `classes` (list of {index, name, description}), `config` (JSON),
`step`, `phase`, `phase_step`, `method`, `best_dice`, `best_step`; training checkpoints add `teacher`,
`optimizer`, `rng` (generator states as uint8 tensors), `sampler` and `planned` (unlabeled batches
already drawn for upcoming steps), `best_pretrain_dice`, `prefetch_stats`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from shared.data.types import ClassInfo
from student_trainer.unet import UNet

FORMAT = 1
KIND = "vessa-student"


def atomic_save(obj: dict[str, Any], path: str | Path) -> Path:
    """torch.save to a temporary file, then rename: a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def classes_to_list(classes: list[ClassInfo]) -> list[dict[str, Any]]:
    return [{"index": c.index, "name": c.name, "description": c.description} for c in classes]


def classes_from_list(items: list[dict[str, Any]]) -> list[ClassInfo]:
    return [ClassInfo(int(c["index"]), str(c["name"]), str(c.get("description", ""))) for c in items]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    ckpt = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        raise ValueError(f"{path} is not a VESSA student checkpoint")
    return ckpt


def _unwrap_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # a torch.compile'd module saves its keys under `_orig_mod.`
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def model_from_checkpoint(
    ckpt: dict[str, Any], device: str | torch.device = "cpu"
) -> tuple[UNet, list[ClassInfo], int]:
    """Build the student of a checkpoint, in eval mode. Returns (model, classes, image_size)."""
    meta = ckpt["model_meta"]
    model = UNet(
        in_channels=int(meta["in_channels"]),
        num_classes=int(meta["num_classes"]),
        upsampling=meta["upsampling"],
    )
    model.load_state_dict(_unwrap_state(ckpt["model"]))
    model.to(device).eval()
    return model, classes_from_list(ckpt["classes"]), int(meta["image_size"])

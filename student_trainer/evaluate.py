"""Validation during training and `vessa eval`: 3D metrics per volume with `shared.metrics`.

Each volume is segmented slice by slice at the training resolution and resized back to its own size
(`student_trainer.inference`); metrics are computed on the 3D label map per foreground class (Dice,
Jaccard, HD95, ASD in voxels, and in mm where the spacing is known), averaged over volumes then classes.
During training the cheaper `dice` mode computes Dice alone (same empty-prediction policy); the best
checkpoint is always re-scored with all four metrics at the end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.data.layouts import open_dataset
from shared.data.types import ClassInfo, Volume
from shared.metrics import binary_metrics, evaluate_volume, format_table, summarise
from student_trainer.checkpoint import load_checkpoint, model_from_checkpoint
from student_trainer.inference import predict_slices, resolve_device

log = logging.getLogger(__name__)


@dataclass
class ValidationSet:
    """The labeled evaluation volumes of one split, read once. volumes[i].image (D, H, W) float32 in
    [0, 1], .label (D, H, W) uint8."""

    split: str
    volumes: list[Volume]
    classes: list[ClassInfo]


def load_validation_set(
    root: str | Path, split: str = "val", max_volumes: int | None = None
) -> ValidationSet:
    ds = open_dataset(root)
    ids = ds.volume_ids(split)
    if max_volumes is not None:
        ids = ids[:max_volumes]
    volumes = [ds.read_volume(case_id, split) for case_id in ids]
    for v in volumes:
        if v.label is None:
            raise ValueError(f"volume {v.case_id} of split {split!r} has no label map to evaluate against")
    return ValidationSet(split=split, volumes=volumes, classes=list(ds.classes))


def _dice_only(pred, gt, classes: list[ClassInfo], case_id: str) -> dict[str, Any]:
    """Like `shared.metrics.evaluate_volume`, Dice alone (skips the surface distances)."""
    out: dict[str, Any] = {"case_id": case_id, "spacing": None, "classes": {}}
    for c in classes:
        if c.index == 0:
            continue
        p, g = pred == c.index, gt == c.index
        empty = not p.any() or not g.any()
        out["classes"][c.name] = {"index": c.index, "dice": 0.0 if empty else binary_metrics(p, g)["dice"]}
    return out


def score_volumes(
    model: nn.Module,
    volumes: list[Volume],
    classes: list[ClassInfo],
    image_size: int,
    device: torch.device,
    amp: bool = True,
    full: bool = True,
    save_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Per-volume metric dicts (shared.metrics format); optionally writes each prediction as NIfTI."""
    per_volume = []
    for vol in volumes:
        pred = predict_slices(model, vol.image, image_size, device, amp=amp).numpy()
        if full:
            per_volume.append(evaluate_volume(pred, vol.label, classes, vol.spacing, vol.case_id))
        else:
            per_volume.append(_dice_only(pred, vol.label, classes, vol.case_id))
        if save_dir is not None:
            from shared.data.nifti import save_label_nifti

            save_label_nifti(pred, vol, save_dir / f"{vol.case_id}.nii.gz")
    return per_volume


def validate(
    model: nn.Module,
    val: ValidationSet,
    classes: list[ClassInfo],
    image_size: int,
    device: torch.device,
    amp: bool = True,
    full: bool = False,
) -> dict[str, Any]:
    """{"mean_dice", "per_class": {name: {metric: mean}}, "summary": shared.metrics.summarise(...)}."""
    per_volume = score_volumes(model, val.volumes, classes, image_size, device, amp, full)
    summary = summarise(per_volume)
    per_class = {name: {m: v["mean"] for m, v in vals.items()} for name, vals in summary["per_class"].items()}
    return {"mean_dice": summary["mean"]["dice"], "per_class": per_class, "summary": summary}


def evaluate_checkpoint(
    ckpt_path: str | Path,
    val: ValidationSet,
    device: torch.device | str = "cpu",
    amp: bool = True,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Full metrics of a checkpoint on `val`. With `out_dir`, predictions are written there as
    `<case>.nii.gz` (input affine/header; identity affine with the known spacing for HDF5 volumes)."""
    device = torch.device(device)
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    model, classes, image_size = model_from_checkpoint(ckpt, device)
    if [c.index for c in classes] != [c.index for c in val.classes]:
        raise ValueError(
            f"the checkpoint predicts classes {[c.name for c in classes]}, the data has {[c.name for c in val.classes]}"
        )
    save_dir = Path(out_dir) / "predictions" if out_dir is not None else None
    per_volume = score_volumes(model, val.volumes, classes, image_size, device, amp, True, save_dir)
    summary = summarise(per_volume)
    return {
        "checkpoint": str(ckpt_path),
        "method": ckpt.get("method"),
        "step": ckpt.get("step"),
        "split": val.split,
        "classes": [c.name for c in classes if c.index != 0],
        "volumes": per_volume,
        "summary": summary,
        "table": format_table(summary),
    }


def run_eval(
    ckpt: str | Path,
    data_root: str | Path,
    split: str = "val",
    out_dir: str | Path | None = None,
    device: str = "auto",
    max_volumes: int | None = None,
) -> dict[str, Any]:
    """`vessa eval`: evaluate `ckpt` on `split` of the dataset at `data_root`; with `out_dir`, write
    metrics.json and predictions/<case>.nii.gz there."""
    dev = resolve_device(device)
    val = load_validation_set(data_root, split, max_volumes)
    report = evaluate_checkpoint(ckpt, val, dev, amp=True, out_dir=out_dir)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(
            json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2)
        )
    return report

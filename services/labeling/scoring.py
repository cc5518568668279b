"""`vessa label score`: written labels against ground truth where a user has some.

Per case and class: Dice and HD95 (voxels, and mm where the spacing is known) with the project's
metrics (shared/metrics.py, the same as every evaluation); and the Spearman correlation between the
cases' confidence and their true mean Dice, which says whether the ranking can be trusted.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from scipy.stats import spearmanr

from services.labeling.outputs import CaseRecord, read_records
from shared.data.nifti import load_label_nifti
from shared.data.types import ClassInfo
from shared.metrics import evaluate_volume, format_table, summarise

_ENDINGS = (".nii.gz", ".nii")


def truth_of(truth: Path, case_id: str) -> tuple[str, Path] | None:
    """Where the ground truth of a case lies: ("nifti", path) or ("h5", path), or None."""
    if (truth / "dataset.json").is_file():
        candidates = [truth / folder / f"{case_id}{e}" for folder in ("labelsTr", "labelsTs") for e in _ENDINGS]
    else:
        candidates = [truth / f"{case_id}{e}" for e in _ENDINGS] + [truth / "labels" / f"{case_id}{e}" for e in _ENDINGS]
    for c in candidates:
        if c.is_file():
            return "nifti", c
    h5 = truth / "volumes" / f"{case_id}.h5"
    if h5.is_file():
        return "h5", h5
    return None


def _load_pair(rec: CaseRecord, out: Path, where: tuple[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    kind, path = where
    if kind == "h5":
        with h5py.File(path, "r") as f:
            if "label" not in f:
                raise ValueError(f"{path.name} has no 'label' dataset")
            gt = np.asarray(f["label"][()]).astype(np.uint8)
        pred = load_label_nifti(out / rec.output, axes=(2, 0, 1))  # how an HDF5 case was written
        return pred, gt if gt.ndim == 3 else gt[None]
    gt = load_label_nifti(path)
    pred = load_label_nifti(out / rec.output)
    return pred, gt


def _score_cine(rec: CaseRecord, out: Path, where: tuple[str, Path]) -> list[dict]:
    """A cine's frames against a 4D ground truth (x, y, z, t): one entry per frame, `<case>_tNN`."""
    import nibabel as nib

    from shared.data.nifti import through_plane_axes

    kind, path = where
    if kind != "nifti":
        raise ValueError("a cine's ground truth must be a 4D NIfTI")
    pred_img, gt_img = nib.load(str(out / rec.output)), nib.load(str(path))
    pred = np.rint(np.asanyarray(pred_img.dataobj)).astype(np.uint8)
    gt = np.rint(np.asanyarray(gt_img.dataobj)).astype(np.uint8)
    if pred.shape != gt.shape or pred.ndim != 4:
        raise ValueError(f"4D label shape {pred.shape} differs from the ground truth's {gt.shape}")
    axes = through_plane_axes(tuple(float(z) for z in pred_img.header.get_zooms()[:3]))
    classes = [ClassInfo(s.index, name) for name, s in sorted(rec.classes.items(), key=lambda kv: kv[1].index) if s.index]
    spacing = rec.spacing if rec.spacing and len(rec.spacing) == 3 else None
    frames = {f.frame: f for f in rec.frames or []}
    entries = []
    for t in range(pred.shape[3]):
        m = evaluate_volume(np.transpose(pred[..., t], axes), np.transpose(gt[..., t], axes), classes, spacing, f"{rec.case_id}_t{t:02d}")
        m["confidence"] = frames[t].confidence if t in frames else rec.confidence
        m["mean_dice"] = float(np.mean([c["dice"] for c in m["classes"].values()])) if m["classes"] else 0.0
        m["frame"] = t
        entries.append(m)
    return entries


def score(out: Path, truth: Path) -> dict:
    """Scores of every labeled case that has a ground truth; written to OUT/score.json."""
    records = {k: r for k, r in read_records(out).items() if r.status == "ok" and r.output}
    if not records:
        raise ValueError(f"no labeled cases under {out}")
    per_case, skipped = [], {}
    for case_id, rec in sorted(records.items()):
        where = truth_of(truth, case_id)
        if where is None:
            skipped[case_id] = "no ground truth"
            continue
        if rec.frames is not None:  # a 4D cine: every frame scored on its own
            try:
                per_case += _score_cine(rec, out, where)
            except (ValueError, OSError) as exc:
                skipped[case_id] = str(exc)
            continue
        try:
            pred, gt = _load_pair(rec, out, where)
        except (ValueError, OSError) as exc:
            skipped[case_id] = str(exc)
            continue
        if pred.shape != gt.shape:
            skipped[case_id] = f"label shape {pred.shape} differs from the ground truth's {gt.shape}"
            continue
        classes = [ClassInfo(s.index, name) for name, s in sorted(rec.classes.items(), key=lambda kv: kv[1].index) if s.index]
        spacing = rec.spacing if rec.spacing and len(rec.spacing) == 3 else None
        m = evaluate_volume(pred, gt, classes, spacing, case_id)
        m["confidence"] = rec.confidence
        m["mean_dice"] = float(np.mean([c["dice"] for c in m["classes"].values()])) if m["classes"] else 0.0
        per_case.append(m)
    if not per_case:
        raise ValueError(f"none of the {len(records)} labeled cases has a ground truth in {truth}")
    summary = summarise(per_case)
    rho = None
    if len(per_case) >= 3:
        r = spearmanr([c["confidence"] or 0.0 for c in per_case], [c["mean_dice"] for c in per_case]).statistic
        rho = None if np.isnan(r) else float(r)
    result = {"truth": str(truth), "cases": per_case, "skipped": skipped, "summary": summary, "spearman_confidence_dice": rho}
    (out / "score.json").write_text(json.dumps(result, indent=1))
    return result


def score_table(result: dict) -> str:
    lines = [f"{'case':<28} {'conf':>6} {'Dice %':>7} " + " ".join(f"{n:>8}" for n in result["summary"]["per_class"])]
    for c in sorted(result["cases"], key=lambda c: c["confidence"] or 0.0):
        per = " ".join(f"{100 * v['dice']:8.2f}" for v in c["classes"].values())
        lines.append(f"{c['case_id'][:28]:<28} {c['confidence'] or 0:6.3f} {100 * c['mean_dice']:7.2f} {per}")
    lines += ["", format_table(result["summary"])]
    rho = result["spearman_confidence_dice"]
    lines.append(f"Spearman(confidence, Dice) = {'n/a (fewer than 3 cases)' if rho is None else f'{rho:.3f}'} over {len(result['cases'])} cases")
    if result["skipped"]:
        lines.append(f"{len(result['skipped'])} cases not scored: " + "; ".join(f"{k}: {v}" for k, v in list(result["skipped"].items())[:5]))
    return "\n".join(lines)

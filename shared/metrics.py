"""Segmentation metrics per volume and class, computed as the SSL4MIS / BCP / ABD tables compute them.

For each foreground class c, on the 3D label maps `pred == c` and `gt == c` (medpy.metric.binary
definitions, re-implemented with scipy):

- Dice = 2|P & G| / (|P| + |G|); Jaccard = |P & G| / |P | G|.
- Surfaces: a mask's surface is `mask XOR binary_erosion(mask)` with the 3D 6-connected structuring
  element and zero border (so objects touching the image edge have a surface there).
- HD95: the 95th percentile (numpy's linear interpolation) of the union of both directed surface
  distance sets, P-surface -> G-surface and G-surface -> P-surface (medpy `hd95`).
- ASD: the mean of the directed distances from P's surface to G's surface only (medpy `asd`, which is
  what SSL4MIS reports; medpy's symmetric `assd` is not used). Note ASD is therefore not symmetric.
- Distances in voxels (spacing 1, as the published tables) and, when a spacing (z, y, x) in mm is given,
  also in mm (`distance_transform_edt(..., sampling=spacing)`).

EMPTY_POLICY (what happens when a mask is empty), following SSL4MIS's `val_2D.calculate_metric_percase`
(and ABD's ACDC test, which returns 0 for every metric when the prediction is empty):

- pred and gt both non-empty: computed as above.
- pred empty (gt empty or not): dice = jaccard = hd95 = asd = 0.
- pred non-empty, gt empty: SSL4MIS would call medpy's hd95, which raises; this never happens on ACDC,
  where every class is present in every ground-truth volume. We return dice = jaccard = 0 (medpy's dc /
  jc values) and hd95 = asd = 0, the same as the empty-prediction branch. (The "return 1, 0" branch that
  circulates in TransUNet-derived code is not SSL4MIS's.)

Each result carries `pred_empty` / `gt_empty` flags so a caller can drop or re-score those cases.
Averages (`summarise`) are over volumes per class, then over classes, as the tables do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from shared.data.types import ClassInfo

EMPTY_POLICY = "ssl4mis"
METRICS = ("dice", "jaccard", "hd95", "asd")


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus one voxel. Exact for these metrics: erosion
    with a zero border sees the same neighbourhood, and every surface voxel stays inside the crop."""
    any_ = a | b
    slices = []
    for axis in range(any_.ndim):
        other = tuple(i for i in range(any_.ndim) if i != axis)
        hit = np.flatnonzero(any_.any(axis=other))
        lo, hi = max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, any_.shape[axis])
        slices.append(slice(lo, hi))
    sl = tuple(slices)
    return a[sl], b[sl]


def _surface(mask: np.ndarray) -> np.ndarray:
    footprint = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=footprint, iterations=1, border_value=0)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (a-surface -> b-surface, b-surface -> a-surface), float64 1D arrays.

    a, b: boolean masks of the same shape, both non-empty. spacing: per-axis voxel size (None: 1)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    a, b = _crop_to_union(a, b)
    sa, sb = _surface(a), _surface(b)
    sampling = None if spacing is None else [float(s) for s in spacing]
    dt_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    dt_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
    return dt_b[sa], dt_a[sb]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """medpy `dc`: 2|P & G| / (|P| + |G|), 0 when both are empty."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    denom = int(p.sum()) + int(g.sum())
    return 0.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """medpy `jc`: |P & G| / |P | G|, 0 when both are empty."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    union = int((p | g).sum())
    return 0.0 if union == 0 else int((p & g).sum()) / union


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """medpy `hd95`: 95th percentile of both directed surface distance sets together."""
    d1, d2 = surface_distances(pred, gt, spacing)
    return float(np.percentile(np.hstack((d1, d2)), 95))


def asd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """medpy `asd`: mean distance from the prediction's surface to the ground truth's (one direction)."""
    d1, _ = surface_distances(pred, gt, spacing)
    return float(d1.mean())


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> dict:
    """Dice, Jaccard, HD95 and ASD of two boolean masks under EMPTY_POLICY (see the module docstring).

    Returns {"dice", "jaccard", "hd95", "asd", "pred_empty", "gt_empty"} and, when `spacing` is given,
    "hd95_mm" and "asd_mm"."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground truth {g.shape}")
    p_empty, g_empty = not p.any(), not g.any()
    out = {"pred_empty": p_empty, "gt_empty": g_empty}
    if p_empty or g_empty:
        out.update(dice=0.0, jaccard=0.0, hd95=0.0, asd=0.0)
        if spacing is not None:
            out.update(hd95_mm=0.0, asd_mm=0.0)
        return out
    out["dice"] = dice(p, g)
    out["jaccard"] = jaccard(p, g)
    d1, d2 = surface_distances(p, g)
    out["hd95"] = float(np.percentile(np.hstack((d1, d2)), 95))
    out["asd"] = float(d1.mean())
    if spacing is not None:
        m1, m2 = surface_distances(p, g, spacing)
        out["hd95_mm"] = float(np.percentile(np.hstack((m1, m2)), 95))
        out["asd_mm"] = float(m1.mean())
    return out


def _foreground(classes: Sequence[ClassInfo | int]) -> list[tuple[int, str]]:
    out = []
    for c in classes:
        idx, name = (c.index, c.name) if isinstance(c, ClassInfo) else (int(c), str(int(c)))
        if idx != 0:  # background is never scored
            out.append((idx, name))
    return out


def evaluate_volume(
    pred: np.ndarray,
    gt: np.ndarray,
    classes: Sequence[ClassInfo | int],
    spacing: Sequence[float] | None = None,
    case_id: str | None = None,
) -> dict:
    """Metrics of one volume. pred, gt: (D, H, W) integer label maps; classes: ClassInfo or indices
    (index 0 skipped); spacing: (z, y, x) mm or None.

    Returns {"case_id", "spacing", "classes": {name: {"index", "dice", "jaccard", "hd95", "asd",
    ["hd95_mm", "asd_mm"], "pred_empty", "gt_empty"}}}."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    if spacing is not None and len(spacing) != gt.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {gt.ndim}D volume")
    result = {
        "case_id": case_id,
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "classes": {},
    }
    for idx, name in _foreground(classes):
        result["classes"][name] = {"index": idx, **binary_metrics(pred == idx, gt == idx, spacing)}
    return result


def summarise(per_volume: Sequence[dict]) -> dict:
    """Mean and std over volumes per class, and the mean over classes of the per-class means.

    Returns {"n_volumes", "metrics", "per_class": {name: {metric: {"mean", "std"}}},
    "mean": {metric: value}}. Metrics in mm are included when every volume has them."""
    if not per_volume:
        raise ValueError("nothing to summarise")
    names = list(per_volume[0]["classes"])
    metrics = [
        m
        for m in (*METRICS, "hd95_mm", "asd_mm")
        if all(m in v["classes"][n] for v in per_volume for n in names)
    ]
    per_class: dict[str, dict] = {}
    for name in names:
        per_class[name] = {}
        for m in metrics:
            values = np.array([v["classes"][name][m] for v in per_volume], dtype=np.float64)
            per_class[name][m] = {"mean": float(values.mean()), "std": float(values.std())}
    mean = {m: float(np.mean([per_class[n][m]["mean"] for n in names])) for m in metrics}
    return {"n_volumes": len(per_volume), "metrics": metrics, "per_class": per_class, "mean": mean}


def format_table(summary: dict, digits: int = 2) -> str:
    """A printable table: one row per class plus the mean; Dice and Jaccard in %, distances in voxels
    (and mm when present), each as mean ± std over volumes."""
    metrics = summary["metrics"]
    heads = {
        "dice": "Dice %",
        "jaccard": "Jaccard %",
        "hd95": "HD95 vox",
        "asd": "ASD vox",
        "hd95_mm": "HD95 mm",
        "asd_mm": "ASD mm",
    }
    scale = {"dice": 100.0, "jaccard": 100.0}
    rows = []
    for name, vals in summary["per_class"].items():
        cells = [
            f"{vals[m]['mean'] * scale.get(m, 1.0):.{digits}f} ± {vals[m]['std'] * scale.get(m, 1.0):.{digits}f}"
            for m in metrics
        ]
        rows.append([name, *cells])
    rows.append(["mean", *[f"{summary['mean'][m] * scale.get(m, 1.0):.{digits}f}" for m in metrics]])
    header = ["class", *[heads[m] for m in metrics]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))  # noqa: E731
    lines = [f"{summary['n_volumes']} volumes", fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def comparison_table(summaries: dict[str, dict], digits: int = 2) -> str:
    """Several `summarise` results side by side, one row each: Dice % per class, then the means over
    classes of Dice %, Jaccard %, HD95 and ASD (voxels)."""
    if not summaries:
        return ""
    first = next(iter(summaries.values()))
    names = list(first["per_class"])
    head = ["", *[f"Dice {n}" for n in names], "Dice", "Jaccard", "HD95", "ASD"]
    rows = [head]
    for label, s in summaries.items():
        dice = [100.0 * s["per_class"][n]["dice"]["mean"] for n in names]
        m = s["mean"]
        rows.append(
            [label, *[f"{d:.{digits}f}" for d in dice], f"{100.0 * m['dice']:.{digits}f}", f"{100.0 * m['jaccard']:.{digits}f}",
             f"{m['hd95']:.{digits}f}", f"{m['asd']:.{digits}f}"]
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)

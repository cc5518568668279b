"""`vessa data info`: a summary of a dataset (layout, counts, shapes, spacing, class voxel counts).

This is a reporting tool, not training code: it reads the labels of every training slice and of the
evaluation volumes to count voxels per class.
"""

from __future__ import annotations

import numpy as np

from shared.data.base import SliceDataset


def _range(values: list) -> list | None:
    """[min, max] as plain Python numbers (ints stay ints), or None for no values."""
    if not values:
        return None
    return [np.asarray(min(values)).item(), np.asarray(max(values)).item()]


def dataset_info(ds: SliceDataset, with_labels: bool = True, progress: bool = False) -> dict:
    """Summary dict of `ds` (JSON-able). With `with_labels`, voxel counts per class over all training
    slices and over each evaluation split's volumes."""
    refs = ds.slice_refs()
    n_classes = len(ds.classes)
    shapes: list[tuple[int, int]] = []
    slice_counts = np.zeros(n_classes, np.int64)
    it = refs
    if progress:
        from tqdm import tqdm

        it = tqdm(refs, desc="slices", unit="slice")
    for ref in it:
        if with_labels:
            item = ds.read_labeled(ref)
            shapes.append(tuple(item.image.shape))
            slice_counts += np.bincount(item.label.ravel(), minlength=n_classes)[:n_classes]
        else:
            shapes.append(ds.slice_shape(ref))
    original = None
    if hasattr(ds, "original_shape"):
        orig = [ds.original_shape(r) for r in refs]
        original = {"height": _range([s[0] for s in orig]), "width": _range([s[1] for s in orig])}

    spacings = [sp for sp in (ds.case_spacing(c) for c in ds.cases()) if sp is not None]
    volumes: dict[str, dict] = {}
    for split in ds.volume_splits():
        ids = ds.volume_ids(split)
        counts = np.zeros(n_classes, np.int64)
        vshapes, vspacing = [], []
        for case in ids:
            vol = ds.read_volume(case, split, with_label=with_labels)
            vshapes.append(vol.image.shape)
            if vol.spacing is not None:
                vspacing.append(vol.spacing)
            if with_labels and vol.label is not None:
                counts += np.bincount(vol.label.ravel(), minlength=n_classes)[:n_classes]
        volumes[split] = {
            "count": len(ids),
            "depth": _range([s[0] for s in vshapes]),
            "height": _range([s[1] for s in vshapes]),
            "width": _range([s[2] for s in vshapes]),
            "label_counts": counts.tolist() if with_labels else None,
        }
        spacings.extend(vspacing)

    spacing = None
    if spacings:
        arr = np.asarray(spacings, dtype=np.float64)
        spacing = {
            "z": _range(arr[:, 0].tolist()),
            "y": _range(arr[:, 1].tolist()),
            "x": _range(arr[:, 2].tolist()),
        }
    return {
        "root": str(ds.root),
        "name": ds.name,
        "format": ds.format,
        "cases": len(ds.cases()),
        "training_slices": len(refs),
        "patients": len(ds.patients()),
        "volumes": volumes,
        "classes": [{"index": c.index, "name": c.name, "description": c.description} for c in ds.classes],
        "slice_shape": {"height": _range([s[0] for s in shapes]), "width": _range([s[1] for s in shapes])},
        "original_slice_shape": original,
        "spacing_mm": spacing,
        "label_counts": {"training_slices": slice_counts.tolist()} if with_labels else None,
    }


def _fmt_range(r: list[float] | None, unit: str = "", digits: int = 0) -> str:
    if r is None:
        return "unknown"
    lo, hi = (f"{float(v):.{digits}f}" for v in r)
    return f"{lo}{unit}" if lo == hi else f"{lo}..{hi}{unit}"


def format_info(info: dict) -> str:
    """Human-readable text of `dataset_info`."""
    lines = [
        f"dataset          {info['name']}  ({info['format']})  {info['root']}",
        f"training cases   {info['cases']:,}",
        f"training slices  {info['training_slices']:,}",
        f"patients         {info['patients']:,}",
    ]
    for split in ("val", "test"):
        v = info["volumes"].get(split)
        if v is None:
            lines.append(f"{split + ' volumes':<16} none")
        else:
            lines.append(
                f"{split + ' volumes':<16} {v['count']:,}  (D {_fmt_range(v['depth'])}, H {_fmt_range(v['height'])}, "
                f"W {_fmt_range(v['width'])})"
            )
    lines.append("classes          " + ", ".join(f"{c['index']} {c['name']}" for c in info["classes"]))
    s = info["slice_shape"]
    lines.append(f"slice shape      H {_fmt_range(s['height'])} x W {_fmt_range(s['width'])}")
    if info.get("original_slice_shape"):
        o = info["original_slice_shape"]
        lines.append(f"original shape   H {_fmt_range(o['height'])} x W {_fmt_range(o['width'])}")
    sp = info["spacing_mm"]
    if sp is None:
        lines.append("spacing (mm)     unknown (the source layout stores none)")
    else:
        lines.append(
            f"spacing (mm)     z {_fmt_range(sp['z'], digits=2)}, y {_fmt_range(sp['y'], digits=2)}, "
            f"x {_fmt_range(sp['x'], digits=2)}"
        )
    if info.get("label_counts"):
        names = [c["name"] for c in info["classes"]]

        def counts(values: list[int]) -> str:
            return ", ".join(f"{n} {v:,}" for n, v in zip(names, values, strict=False))

        lines.append(f"label voxels     training slices: {counts(info['label_counts']['training_slices'])}")
        for split, v in info["volumes"].items():
            if v.get("label_counts") is not None:
                lines.append(f"{'':17}{split} volumes: {counts(v['label_counts'])}")
    return "\n".join(lines)

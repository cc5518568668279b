"""A second evaluation set from a dataset's training cases: volumes of patients that no labeled split uses.

The validation volumes choose checkpoints and recipes, so a figure measured on them flatters. This writes
the frames of the *last* K patients of the protocol order (never among the first N labeled ones for any
N the protocol uses with fewer patients) as 3D volumes in the SSL4MIS layout, with a `test.list`, so
`vessa assistant eval --split test` scores a recipe on volumes no choice was made on. Their labels are
read here, for evaluation only: training code never sees this directory.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np

from shared.data import open_dataset


def write_holdout(source: str | Path, out: str | Path, patients: int = 10, protect: int = 7) -> list[str]:
    """Stack the slices of every frame of the last `patients` patients into volumes under `out`.

    protect: the first `protect` patients of the protocol order are never taken (the labeled sets).
    Returns the case ids written. Only datasets whose cases are split into slices are supported.
    """
    ds = open_dataset(source)
    order = ds.patients()
    if len(order) <= protect:
        raise ValueError(f"{source} has {len(order)} patients: none left after the first {protect}")
    chosen = set(order[max(protect, len(order) - patients) :])
    frames: dict[str, list] = defaultdict(list)
    for ref in ds.slice_refs():
        if ref.patient_id in chosen:
            frames[ref.case_id].append(ref)
    out = Path(out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    (out / "slices").mkdir(exist_ok=True)
    cases = sorted(frames)
    keys = []
    for case in cases:
        refs = sorted(frames[case], key=lambda r: r.slice_index)
        items = [ds.read_labeled(r) for r in refs]
        shapes = {it.image.shape for it in items}
        if len(shapes) != 1:
            raise ValueError(f"case {case}: slices of different sizes {sorted(shapes)}")
        with h5py.File(out / "volumes" / f"{case}.h5", "w") as f:
            f.create_dataset("image", data=np.stack([it.image for it in items]).astype(np.float32))
            f.create_dataset("label", data=np.stack([it.label for it in items]).astype(np.uint8))
        for r, it in zip(refs, items):  # the same slices, so the directory is a complete dataset
            with h5py.File(out / "slices" / f"{r.key}.h5", "w") as f:
                f.create_dataset("image", data=it.image.astype(np.float32))
                f.create_dataset("label", data=it.label.astype(np.uint8))
            keys.append(r.key)
    (out / "test.list").write_text("".join(f"{c}\n" for c in cases))
    (out / "train_slices.list").write_text("".join(f"{k}\n" for k in keys))
    return cases

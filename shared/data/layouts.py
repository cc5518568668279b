"""Which on-disk layout a dataset directory has, and opening it as a `SliceDataset`.

Apart from `base` so that the interface never imports its implementations (each layout imports `base`)."""

from __future__ import annotations

from pathlib import Path

from shared.data.base import SliceDataset
from shared.data.cache_layout import CacheDataset
from shared.data.h5_layout import SSL4MISDataset
from shared.data.msd_layout import MSDDataset


def detect_format(path: str | Path) -> str:
    """'vessa-cache', 'ssl4mis-h5' or 'msd-nifti' for a dataset directory. Raises ValueError otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    if (root / "vessa_cache.json").is_file():
        return "vessa-cache"
    if (root / "train_slices.list").is_file() and (root / "slices").is_dir():
        return "ssl4mis-h5"
    if (root / "dataset.json").is_file():
        return "msd-nifti"
    raise ValueError(
        f"{root} is not a known dataset layout: expected vessa_cache.json (prepared cache), "
        "train_slices.list + slices/ (SSL4MIS HDF5) or dataset.json (nnU-Net/MSD NIfTI)"
    )


def open_dataset(path: str | Path) -> SliceDataset:
    """Open a dataset directory, detecting its layout (see `detect_format`)."""
    fmt = detect_format(path)
    if fmt == "vessa-cache":
        return CacheDataset(path)
    if fmt == "ssl4mis-h5":
        return SSL4MISDataset(path)
    return MSDDataset(path)

"""`vessa data prepare`: a compact cache of a dataset that a GPU run can carry.

What it stores (read back by `shared.data.cache_layout.CacheDataset`, which `open_dataset` detects):

- training slices resized to size x size: images bilinear (half-pixel centres, as torch's
  `F.interpolate(..., align_corners=False)`), quantised to uint8 = round(clip(image, 0, 1) * 255);
  labels nearest (torch 'nearest-exact'), uint8. Images go to `train_images.bin` in chunks; labels to
  `train_labels.bin`, one stream per slice, so unlabeled reads never load or decode a label. Labels of
  all training slices are stored: the protocol split decides later which are used.
- evaluation volumes ('val', and 'test' when the source has it) at their ORIGINAL resolution, because
  metrics are computed there: `<split>_images.bin` / `<split>_labels.bin`, one stream per volume.
- `vessa_cache.json`: format version, source, size, class table, the slice index (key, case, patient,
  slice index, original shape), the volume index (shape, spacing, affine) and the pack entries.

Storage codec: see `shared.data.packing` (default `bz2-up`; ACDC: ~38 MB of training images).
The index is written last (via a temporary file), so a half-written cache is never detected as one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from shared.data.base import SliceDataset
from shared.data.cache_format import CACHE_FORMAT, CACHE_VERSION, INDEX_NAME, quantise
from shared.data.classes import classes_to_json
from shared.data.layouts import open_dataset
from shared.data.packing import CODECS, PackWriter
from shared.data.resize import resize_image, resize_label

CHUNK_SLICES = 64  # slices per compressed image stream: ~4 MB raw, bz2 works in 900 kB blocks anyway


def _spacing_list(spacing) -> list[float] | None:
    return None if spacing is None else [float(s) for s in spacing]


def prepare_cache(
    source: str | Path | SliceDataset,
    out: str | Path,
    size: int = 256,
    codec: str = "bz2-up",
    workers: int = 2,
    progress: bool = False,
) -> dict:
    """Write the cache of `source` (a dataset directory or an open SliceDataset) into `out`.

    Returns the index written to `out/vessa_cache.json`, with a `sizes` entry giving each file's bytes.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    ds = source if isinstance(source, SliceDataset) else open_dataset(source)
    if ds.format == CACHE_FORMAT:
        raise ValueError(f"{ds.root} already is a prepared cache")
    out = Path(out)
    if out.resolve() == Path(ds.root).resolve():
        raise ValueError("the cache must go to a different directory than its source")
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # an interrupted rewrite must not look valid
    started = time.perf_counter()

    def bar(it, desc, total=None):
        if not progress:
            return it
        from tqdm import tqdm

        return tqdm(it, desc=desc, total=total, unit="item")

    refs = ds.slice_refs()
    slices, images = [], np.empty((len(refs), size, size), np.uint8)
    label_blobs: list[np.ndarray] = []
    for i, ref in enumerate(bar(refs, "slices")):
        item = ds.read_labeled(ref)
        slices.append(
            {
                "key": ref.key,
                "case_id": ref.case_id,
                "patient_id": ref.patient_id,
                "slice_index": ref.slice_index,
                "shape": [int(s) for s in item.image.shape],
            }
        )
        images[i] = quantise(resize_image(item.image, (size, size)))
        label_blobs.append(resize_label(item.label, (size, size)).astype(np.uint8))

    chunks = []
    with PackWriter(out / "train_images.bin") as pack:
        parts = [images[s : s + CHUNK_SLICES] for s in range(0, len(refs), CHUNK_SLICES)]
        for start, entry in zip(
            range(0, len(refs), CHUNK_SLICES), pack.add_many(parts, codec, workers), strict=True
        ):
            chunks.append({**entry, "start": start, "count": int(entry["shape"][0])})
    with PackWriter(out / "train_labels.bin") as pack:
        label_entries = pack.add_many(label_blobs, "zlib", workers)  # tiny, mostly zeros: zlib is fastest
    for meta, entry in zip(slices, label_entries, strict=True):
        meta["label"] = entry

    case_spacing = {}
    for case in ds.cases():
        sp = ds.case_spacing(case)
        if sp is not None:
            case_spacing[case] = _spacing_list(sp)

    volumes: dict[str, list[dict]] = {}
    for split in ds.volume_splits():
        ids = ds.volume_ids(split)
        entries = []
        with (
            PackWriter(out / f"{split}_images.bin") as ipack,
            PackWriter(out / f"{split}_labels.bin") as lpack,
        ):
            for case in bar(ids, f"{split} volumes"):
                vol = ds.read_volume(case, split, with_label=True)
                entries.append(
                    {
                        "case_id": case,
                        "shape": [int(s) for s in vol.image.shape],
                        "spacing": _spacing_list(vol.spacing),
                        "affine": None if vol.affine is None else np.asarray(vol.affine).tolist(),
                        "axes": list(vol.meta["axes"]) if vol.meta and "axes" in vol.meta else None,
                        "image": ipack.add(quantise(vol.image), codec),
                        "label": lpack.add(np.asarray(vol.label, dtype=np.uint8), "zlib"),
                    }
                )
        volumes[split] = entries

    index = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "name": ds.name,
        "source": {"path": str(Path(ds.root).resolve()), "format": ds.format, "name": ds.name},
        "size": size,
        "codec": codec,
        "image_encoding": "uint8 = round(clip(image, 0, 1) * 255); image = uint8 / 255",
        "resize": {
            "image": "bilinear, half-pixel centres (torch interpolate align_corners=False)",
            "label": "nearest, half-pixel centres (torch 'nearest-exact')",
        },
        "classes": classes_to_json(ds.classes),
        "slices": slices,
        "train_images": {"file": "train_images.bin", "chunks": chunks},
        "train_labels": {"file": "train_labels.bin"},
        "case_spacing": case_spacing,
        "volumes": {
            split: {"images": f"{split}_images.bin", "labels": f"{split}_labels.bin", "cases": entries}
            for split, entries in volumes.items()
        },
    }
    files = ["train_images.bin", "train_labels.bin"] + [
        f"{s}_{k}.bin" for s in volumes for k in ("images", "labels")
    ]
    index["sizes"] = {f: (out / f).stat().st_size for f in files}
    index["seconds"] = round(time.perf_counter() - started, 2)
    tmp = out / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, out / INDEX_NAME)
    return index


def cache_size_bytes(index: dict) -> int:
    """Total bytes of the pack files of a cache index (the JSON index itself excluded)."""
    return int(sum(index.get("sizes", {}).values()))

"""Reader of the prepared cache written by `shared.data.prepare` (detected by `vessa_cache.json`).

Training slices come back at the cache's size (e.g. 256 x 256), images dequantised to float32 in
[0, 1]; `original_shape(ref)` gives each slice's size in the source, which predictions are resized
back to. Evaluation volumes come back at their original resolution.

Images of all training slices are decoded together on first use (one pack, threads). Labels live in
a separate pack, one stream per slice; `read_labeled` decodes only the stream of the slice asked for,
and `read_unlabeled` never opens the label pack.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from shared.data.base import SliceDataset, check_split
from shared.data.cache_format import CACHE_FORMAT, CACHE_VERSION, INDEX_NAME, dequantise
from shared.data.classes import classes_from_json
from shared.data.packing import read_entries, read_entry
from shared.data.types import LabeledSlice, SliceRef, UnlabeledSlice, Volume


class CacheDataset(SliceDataset):
    """A prepared cache as a SliceDataset (see the module docstring)."""

    format = CACHE_FORMAT

    def __init__(self, root: str | Path, workers: int = 2):
        self.root = Path(root)
        path = self.root / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"prepared cache index not found: {path}")
        self.index = json.loads(path.read_text())
        if self.index.get("format") != CACHE_FORMAT or int(self.index.get("version", -1)) != CACHE_VERSION:
            raise ValueError(
                f"{path}: unsupported cache format {self.index.get('format')!r} version "
                f"{self.index.get('version')!r} (expected {CACHE_FORMAT} v{CACHE_VERSION}); prepare it again"
            )
        self.name = str(self.index["name"])
        self.size = int(self.index["size"])
        self.classes = classes_from_json(self.index["classes"])
        self.workers = workers
        self._slices = self.index["slices"]
        self._refs = [
            SliceRef(s["key"], s["case_id"], s["patient_id"], int(s["slice_index"])) for s in self._slices
        ]
        self._pos = {ref.key: i for i, ref in enumerate(self._refs)}
        self._images: np.ndarray | None = None  # (N, size, size) uint8, decoded on first use
        self._labels: dict[int, np.ndarray] = {}  # decoded only for slices read labeled
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # locks do not pickle; data-loader workers get their own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- slices ------------------------------------------------------------------------------------
    def slice_refs(self) -> list[SliceRef]:
        return list(self._refs)

    def _position(self, ref: SliceRef) -> int:
        try:
            return self._pos[ref.key]
        except KeyError:
            raise KeyError(f"slice {ref.key!r} is not in the cache {self.root}") from None

    def _image_array(self) -> np.ndarray:
        if self._images is None:
            with self._lock:
                if self._images is None:
                    spec = self.index["train_images"]
                    parts = read_entries(self.root / spec["file"], spec["chunks"], self.workers)
                    self._images = (
                        np.concatenate(parts, axis=0)
                        if parts
                        else np.empty((0, self.size, self.size), np.uint8)
                    )
        return self._images

    def read_unlabeled(self, ref: SliceRef) -> UnlabeledSlice:
        return UnlabeledSlice(ref=ref, image=dequantise(self._image_array()[self._position(ref)]))

    def read_labeled(self, ref: SliceRef) -> LabeledSlice:
        i = self._position(ref)
        label = self._labels.get(i)
        if label is None:
            label = read_entry(self.root / self.index["train_labels"]["file"], self._slices[i]["label"])
            self._labels[i] = label
        return LabeledSlice(ref=ref, image=dequantise(self._image_array()[i]), label=label.copy())

    def slice_shape(self, ref: SliceRef) -> tuple[int, int]:
        return (self.size, self.size)

    def original_shape(self, ref: SliceRef) -> tuple[int, int]:
        """(H, W) of the slice in the source dataset."""
        return tuple(self._slices[self._position(ref)]["shape"])  # type: ignore[return-value]

    def case_spacing(self, case_id: str) -> tuple[float, float, float] | None:
        sp = self.index.get("case_spacing", {}).get(case_id)
        return None if sp is None else tuple(sp)  # type: ignore[return-value]

    # -- volumes -----------------------------------------------------------------------------------
    def _split(self, split: str) -> dict:
        check_split(split)
        spec = self.index.get("volumes", {}).get(split)
        if spec is None:
            raise FileNotFoundError(
                f"the prepared cache {self.root} has no '{split}' volumes (its source had no '{split}' split)"
            )
        return spec

    def volume_ids(self, split: str) -> list[str]:
        return [v["case_id"] for v in self._split(split)["cases"]]

    def read_volume(self, case_id: str, split: str, with_label: bool = True) -> Volume:
        spec = self._split(split)
        entry = next((v for v in spec["cases"] if v["case_id"] == case_id), None)
        if entry is None:
            raise KeyError(f"volume {case_id!r} is not in the cache's '{split}' split")
        image = dequantise(read_entry(self.root / spec["images"], entry["image"]))
        label = read_entry(self.root / spec["labels"], entry["label"]) if with_label else None
        meta = {"source": "vessa-cache"}
        if entry.get("axes") is not None:
            meta["axes"] = tuple(entry["axes"])
        return Volume(
            case_id=case_id,
            image=image,
            label=label,
            spacing=None if entry.get("spacing") is None else tuple(entry["spacing"]),
            affine=None if entry.get("affine") is None else np.asarray(entry["affine"], dtype=np.float64),
            meta=meta,
        )

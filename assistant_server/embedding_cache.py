"""The embedding cache: a slice's frozen-encoder embedding, computed once, found again by content hash.

Two bounded LRU tiers: the device (GPU memory on a GPU replica) and, below it, host memory; an entry
evicted from the device spills to the host, a host hit is promoted back. An optional directory tier
persists embeddings for CPU runs (the encoder costs about a second per slice on two cores), so a
dataset's slices are embedded once across processes and runs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class CacheEntry:
    """embedding: (256, 64, 64) tensor; shape: the (H, W) of the slice as it was sent."""

    embedding: torch.Tensor
    shape: tuple[int, int]


class EmbeddingCache:
    def __init__(
        self,
        device: torch.device | str = "cpu",
        device_entries: int = 4096,
        host_entries: int = 16384,
        store_dir: str | Path | None = None,
        dtype: torch.dtype = torch.float16,
    ):
        self.device = torch.device(device)
        self.device_entries = device_entries
        # On a CPU replica the two tiers are the same memory: one bound covers both.
        self.host_entries = host_entries if self.device.type != "cpu" else 0
        self.dtype = dtype
        self.store_dir = Path(store_dir) if store_dir else None
        if self.store_dir:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        self._device: OrderedDict[str, CacheEntry] = OrderedDict()
        self._host: OrderedDict[str, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.host_hits = self.store_hits = self.misses = self.evictions = 0

    # --------------------------------------------------------------------------------------------
    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._device.get(key)
            if entry is not None:
                self._device.move_to_end(key)
                self.hits += 1
                return entry
            entry = self._host.pop(key, None)
            if entry is not None:
                self.host_hits += 1
                entry = CacheEntry(entry.embedding.to(self.device, non_blocking=True), entry.shape)
                self._put_device(key, entry)
                return entry
        entry = self._load_from_store(key)
        with self._lock:
            if entry is None:
                self.misses += 1
                return None
            self.store_hits += 1
            self._put_device(key, entry)
            return entry

    def contains(self, key: str) -> bool:
        with self._lock:
            if key in self._device or key in self._host:
                return True
        return bool(self.store_dir and (self.store_dir / f"{key}.safetensors").exists())

    def put(self, key: str, embedding: torch.Tensor, shape: tuple[int, int]) -> None:
        """embedding: (256, 64, 64); stored in the cache's dtype on its device (and in the store)."""
        entry = CacheEntry(embedding.detach().to(self.device, self.dtype), (int(shape[0]), int(shape[1])))
        with self._lock:
            self._put_device(key, entry)
        if self.store_dir is not None and _safe_key(key):
            path = self.store_dir / f"{key}.safetensors"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                save_file(
                    {"embedding": entry.embedding.cpu().contiguous(), "shape": torch.tensor(entry.shape)},
                    str(tmp),
                )
                tmp.replace(path)

    def _put_device(self, key: str, entry: CacheEntry) -> None:
        self._device[key] = entry
        self._device.move_to_end(key)
        while len(self._device) > self.device_entries:
            old_key, old = self._device.popitem(last=False)
            if self.host_entries > 0:
                self._host[old_key] = CacheEntry(old.embedding.to("cpu"), old.shape)
                while len(self._host) > self.host_entries:
                    self._host.popitem(last=False)
                    self.evictions += 1
            else:
                self.evictions += 1

    def _load_from_store(self, key: str) -> CacheEntry | None:
        if self.store_dir is None or not _safe_key(key):
            return None
        path = self.store_dir / f"{key}.safetensors"
        if not path.exists():
            return None
        data = load_file(str(path))
        return CacheEntry(data["embedding"].to(self.device, self.dtype), tuple(int(v) for v in data["shape"]))

    # --------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            lookups = self.hits + self.host_hits + self.store_hits + self.misses
            return {
                "device_entries": len(self._device),
                "device_bound": self.device_entries,
                "host_entries": len(self._host),
                "host_bound": self.host_entries,
                "hits": self.hits,
                "host_hits": self.host_hits,
                "store_hits": self.store_hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "hit_rate": (lookups - self.misses) / lookups if lookups else 0.0,
            }


def _safe_key(key: str) -> bool:
    """Keys are hex content hashes; anything else never reaches the file system."""
    return 0 < len(key) <= 64 and all(ch in "0123456789abcdef" for ch in key)

"""The template bank: gold-standard exemplars the assistant matches each query against.

On disk (one directory, shared by every replica):

    manifest.json           format, version, class table, encoder id, text model, exemplar index
    text.safetensors        {"text": (C, 384) float32} class-text embeddings, row = class index
    exemplars/<id>.safetensors
                            {"image": (256, 256) float16, "label": (256, 256) uint8,
                             "embedding": (256, 64, 64) float16, "descriptor": (4096,) float32}

Writers hold an exclusive lock (`.lock`, flock), write the exemplar files first and then replace the
manifest atomically with version + 1; readers hold a shared lock while loading. A replica notices a new
version on its next `refresh()` (a stat of the manifest), so every replica sees an added or removed
exemplar without a restart.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from shared.data.classes import classes_from_json, classes_to_json
from shared.data.types import ClassInfo

BANK_FORMAT = 1
DESCRIPTOR_GRID = 4  # the global descriptor pools the embedding to 4×4 cells: coarse layout + content
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class BankError(ValueError):
    """A bank that cannot be used as asked (missing, malformed, unknown exemplar, bad id)."""


class BankMismatchError(BankError):
    """A bank that does not fit the model: another class table or another encoder."""


@dataclass(frozen=True)
class Exemplar:
    id: str
    case_id: str
    patient_id: str
    slice_index: int
    source: str
    height: int
    width: int


def validate_exemplar_id(exemplar_id: str) -> str:
    """Exemplar ids name files: letters, digits, '_' and '-' only, so no path can be smuggled in."""
    if not isinstance(exemplar_id, str) or not _ID_RE.match(exemplar_id):
        raise BankError(f"invalid exemplar id {exemplar_id!r}: use 1-64 letters, digits, '_' or '-'")
    return exemplar_id


def global_descriptor(embeddings: torch.Tensor) -> torch.Tensor:
    """Image embeddings (N, 256, 64, 64) → unit global descriptors (N, 256·4·4) for retrieval."""
    pooled = F.adaptive_avg_pool2d(embeddings.float(), DESCRIPTOR_GRID).flatten(1)
    return F.normalize(pooled, dim=1)


def same_class_table(a: list[ClassInfo], b: list[ClassInfo]) -> bool:
    """Class tables match when their indices and names match (descriptions may be reworded)."""
    return [(c.index, c.name) for c in sorted(a, key=lambda c: c.index)] == [
        (c.index, c.name) for c in sorted(b, key=lambda c: c.index)
    ]


class TemplateBank:
    """A persisted, versioned bank; tensors are loaded on first use and reloaded on a new version."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "manifest.json").is_file():
            raise BankError(f"no template bank at {self.root} (manifest.json missing)")
        self._mtime_ns = -1
        self._tensors: dict[str, torch.Tensor] | None = None
        self.refresh()

    # ------------------------------------------------------------------------------------------ create
    @classmethod
    def create(
        cls, root: str | Path, classes: list[ClassInfo], text: np.ndarray, encoder_id: str, text_model: str
    ) -> TemplateBank:
        """An empty bank (version 0). text: (C, 384) class-text embeddings, row = class index."""
        root = Path(root)
        if (root / "manifest.json").exists():
            raise BankError(f"a template bank already exists at {root}")
        if text.shape[0] != len(classes):
            raise BankError(f"{text.shape[0]} text embeddings for {len(classes)} classes")
        (root / "exemplars").mkdir(parents=True, exist_ok=True)
        save_file(
            {"text": torch.as_tensor(text, dtype=torch.float32).contiguous()}, str(root / "text.safetensors")
        )
        manifest = {
            "format": BANK_FORMAT,
            "version": 0,
            "updated": time.time(),
            "classes": classes_to_json(classes),
            "encoder_id": encoder_id,
            "text_model": text_model,
            "image_size": 256,
            "exemplars": [],
        }
        _write_json_atomic(root / "manifest.json", manifest)
        return cls(root)

    # ------------------------------------------------------------------------------------------ read
    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def refresh(self) -> bool:
        """Reload the manifest if it changed on disk; True when it did."""
        mtime = (self.root / "manifest.json").stat().st_mtime_ns
        if mtime == self._mtime_ns:
            return False
        with self._locked(exclusive=False):
            self._load_manifest()
            self._tensors = None
        return True

    def _load_manifest(self) -> None:
        path = self.root / "manifest.json"
        self._mtime_ns = path.stat().st_mtime_ns
        manifest = json.loads(path.read_text())
        if manifest.get("format") != BANK_FORMAT:
            raise BankError(f"bank {self.root} has format {manifest.get('format')}, expected {BANK_FORMAT}")
        self.manifest = manifest
        self.version: int = int(manifest["version"])
        self.classes = classes_from_json(manifest["classes"])
        self.encoder_id: str = manifest["encoder_id"]
        self.exemplars = [Exemplar(**e) for e in manifest["exemplars"]]
        self.text = load_file(str(self.root / "text.safetensors"))["text"]

    def __len__(self) -> int:
        return len(self.exemplars)

    def tensors(self) -> dict[str, torch.Tensor]:
        """All exemplars stacked: embedding (N, 256, 64, 64) f16, label (N, 256, 256) u8,
        image (N, 256, 256) f16, descriptor (N, 4096) f32, on the CPU."""
        if self._tensors is None:
            with self._locked(exclusive=False):
                parts = [load_file(str(self._exemplar_path(e.id))) for e in self.exemplars]
            if parts:
                self._tensors = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
            else:
                self._tensors = {
                    "embedding": torch.zeros(0, 256, 64, 64, dtype=torch.float16),
                    "label": torch.zeros(0, 256, 256, dtype=torch.uint8),
                    "image": torch.zeros(0, 256, 256, dtype=torch.float16),
                    "descriptor": torch.zeros(0, 256 * DESCRIPTOR_GRID**2),
                }
        return self._tensors

    def patient_ids(self) -> list[str]:
        return [e.patient_id for e in self.exemplars]

    def check_compatible(self, classes: list[ClassInfo], encoder_id: str) -> None:
        """Raise BankMismatchError unless this bank has the given class table and encoder."""
        if not same_class_table(self.classes, classes):
            raise BankMismatchError(
                f"template bank {self.root} has classes {[(c.index, c.name) for c in self.classes]}, "
                f"but the assistant was trained for {[(c.index, c.name) for c in classes]}"
            )
        if self.encoder_id != encoder_id:
            raise BankMismatchError(
                f"template bank {self.root} was built with encoder {self.encoder_id[:16]}…, "
                f"the assistant uses {encoder_id[:16]}…: rebuild the bank"
            )

    def differing_texts(self, classes: list[ClassInfo]) -> list[str]:
        """Names of the classes whose description here differs from `classes`' (a checkpoint's, i.e. the
        texts its text tokens were trained on). Not a mismatch (descriptions may be reworded), but the
        text embeddings the model reads are then not the ones it learned with."""
        theirs = {c.index: c.description for c in classes}
        return [c.name for c in self.classes if c.index in theirs and theirs[c.index] != c.description]

    def retrieve(
        self, descriptors: torch.Tensor, k: int, exclude_patients: list[str] | None = None
    ) -> torch.Tensor:
        """Top-k exemplars by cosine similarity of global descriptors.

        descriptors: (B, 4096) unit vectors; exclude_patients: per query, a patient whose exemplars
        must not be returned (Stage-1 training: templates come from other patients). Returns (B, k)
        long indices into the bank (k is capped at the bank size, repeated if the bank is smaller).
        """
        bank_desc = self.tensors()["descriptor"].to(descriptors.device)
        if bank_desc.shape[0] == 0:
            raise BankError("the template bank is empty: add exemplars first")
        sim = descriptors.float() @ bank_desc.T  # (B, N)
        if exclude_patients is not None:
            pids = self.patient_ids()
            mask = torch.tensor(
                [[p == q for p in pids] for q in exclude_patients], device=sim.device, dtype=torch.bool
            )
            sim = sim.masked_fill(mask, -2.0)
        kk = min(k, sim.shape[1])
        idx = sim.topk(kk, dim=1).indices
        if kk < k:  # a tiny bank: repeat the best ones so every query has k templates
            idx = idx[:, torch.arange(k, device=idx.device) % kk]
        return idx

    # ------------------------------------------------------------------------------------------ write
    def _exemplar_path(self, exemplar_id: str) -> Path:
        return self.root / "exemplars" / f"{validate_exemplar_id(exemplar_id)}.safetensors"

    def add(
        self,
        exemplars: list[Exemplar],
        images: torch.Tensor,
        labels: torch.Tensor,
        embeddings: torch.Tensor,
    ) -> int:
        """Add exemplars; returns the new version.

        images: (N, 256, 256) float in [0, 1]; labels: (N, 256, 256) uint8 class indices;
        embeddings: (N, 256, 64, 64) from this bank's encoder.
        """
        n = len(exemplars)
        if not (images.shape[0] == labels.shape[0] == embeddings.shape[0] == n):
            raise BankError("exemplars, images, labels and embeddings must have the same length")
        if labels.numel() and int(labels.max()) >= len(self.classes):
            raise BankError(f"label values must be < {len(self.classes)} (the bank's class count)")
        descriptors = global_descriptor(embeddings)
        with self._locked(exclusive=True):
            self._load_manifest()
            known = {e.id for e in self.exemplars}
            for ex in exemplars:
                validate_exemplar_id(ex.id)
                if ex.id in known:
                    raise BankError(f"exemplar {ex.id!r} is already in the bank")
                known.add(ex.id)
            for i, ex in enumerate(exemplars):
                tmp = self._exemplar_path(ex.id).with_suffix(".tmp")
                save_file(
                    {
                        "image": images[i].detach().cpu().to(torch.float16).contiguous(),
                        "label": labels[i].detach().cpu().to(torch.uint8).contiguous(),
                        "embedding": embeddings[i].detach().cpu().to(torch.float16).contiguous(),
                        "descriptor": descriptors[i].detach().cpu().contiguous(),
                    },
                    str(tmp),
                )
                tmp.replace(self._exemplar_path(ex.id))
            self.manifest["exemplars"] += [asdict(e) for e in exemplars]
            return self._commit()

    def remove(self, exemplar_ids: list[str]) -> int:
        """Remove exemplars by id; returns the new version. Unknown ids raise BankError."""
        with self._locked(exclusive=True):
            self._load_manifest()
            known = {e.id for e in self.exemplars}
            for eid in exemplar_ids:
                validate_exemplar_id(eid)
                if eid not in known:
                    raise BankError(f"no exemplar {eid!r} in the bank")
            gone = set(exemplar_ids)
            self.manifest["exemplars"] = [e for e in self.manifest["exemplars"] if e["id"] not in gone]
            version = self._commit()
            for eid in gone:
                self._exemplar_path(eid).unlink(missing_ok=True)
            return version

    def _commit(self) -> int:
        self.manifest["version"] = int(self.manifest["version"]) + 1
        self.manifest["updated"] = time.time()
        _write_json_atomic(self.root / "manifest.json", self.manifest)
        self._load_manifest()
        self._tensors = None
        return self.version


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)

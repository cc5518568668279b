"""Augmented views of the template bank for Stage-1: more training signal for a few encoder passes, once.

The encoder is frozen, so an augmented exemplar costs one encoder pass ever: its embedding is cached
by the augmented image's content hash (an EmbeddingCache store on disk) and every later run — another
seed, a longer schedule, an ablation — finds it there.

A *view* v ≥ 1 is one geometric transform shared by every exemplar (a 90° rotation and/or flip, then a
small rotation and scale), plus an intensity change (gamma, contrast) drawn per exemplar. Sharing the
geometry keeps an episode consistent: its query and its templates are all taken from the same view, so
the templates still look like the query the way they do in the original data. View 0 is the bank itself.
Everything is derived from (seed, view, exemplar index): the same bank gives the same views.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from assistant_server.embedding_cache import EmbeddingCache
from shared.hashing import slice_hash


@dataclass(frozen=True)
class ViewGeometry:
    """rot90: quarter turns; flip: mirror left-right after them; angle: degrees; scale: zoom factor."""

    rot90: int
    flip: bool
    angle: float
    scale: float


def view_geometry(view: int, seed: int = 0, max_angle: float = 15.0, max_scale: float = 0.1) -> ViewGeometry:
    """The geometric transform of view `view` (view 0: identity)."""
    if view == 0:
        return ViewGeometry(0, False, 0.0, 1.0)
    g = torch.Generator().manual_seed(seed * 7919 + view)
    r = torch.rand(4, generator=g).tolist()
    return ViewGeometry(
        rot90=int(r[0] * 4) % 4,
        flip=r[1] < 0.5,
        angle=(r[2] * 2 - 1) * max_angle,
        scale=1 + (r[3] * 2 - 1) * max_scale,
    )


def apply_geometry(x: torch.Tensor, geom: ViewGeometry, nearest: bool) -> torch.Tensor:
    """x: (N, C, H, W) float → the same transform on every item (bilinear, or nearest for labels)."""
    x = torch.rot90(x, geom.rot90, dims=(2, 3))
    if geom.flip:
        x = x.flip(3)
    if geom.angle == 0 and geom.scale == 1:
        return x
    a = math.radians(geom.angle)
    cos, sin = math.cos(a) / geom.scale, math.sin(a) / geom.scale
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(
        x, grid, mode="nearest" if nearest else "bilinear", padding_mode="zeros", align_corners=False
    )


def apply_intensity(
    images: torch.Tensor, gen: torch.Generator, max_gamma: float = 0.4, max_contrast: float = 0.2
):
    """images: (N, H, W) in [0, 1] → per-image gamma in [1/(1+g), 1+g] and contrast about the mean."""
    n = images.shape[0]
    r = torch.rand(n, 2, generator=gen)
    gamma = torch.exp((r[:, 0] * 2 - 1) * math.log(1 + max_gamma))[:, None, None]
    contrast = (1 + (r[:, 1] * 2 - 1) * max_contrast)[:, None, None]
    out = images.clamp(0, 1) ** gamma
    mean = out.mean(dim=(1, 2), keepdim=True)
    return ((out - mean) * contrast + mean).clamp(0, 1)


def augmented_view(
    images: torch.Tensor, labels: torch.Tensor, view: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 256, 256) float in [0, 1], labels (N, 256, 256) integer → view `view` of both."""
    geom = view_geometry(view, seed)
    img = apply_geometry(images.float()[:, None], geom, nearest=False)[:, 0]
    lab = apply_geometry(labels.float()[:, None], geom, nearest=True)[:, 0].round().to(labels.dtype)
    if view:
        img = apply_intensity(img, torch.Generator().manual_seed(seed * 104_729 + view))
    return img, lab


def view_key(image: torch.Tensor) -> str:
    """Content hash of an augmented image as the encoder sees it (float16, like the bank's images)."""
    return slice_hash(image.to(torch.float16).cpu().numpy())


def build_views(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    views: int,
    store: str | Path,
    device: torch.device,
    seed: int = 0,
    batch_size: int = 8,
    cpu_bf16: bool = False,
    encode_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Embeddings and labels of views 1..`views` of the bank's exemplars, computed where the store does
    not hold them yet. Returns embeddings (V, N, 256, 64, 64) float16, labels (V, N, 256, 256) uint8 and
    counts {"encoded", "reused"}. encode_fn: an engine in place of `model.encode`."""
    from assistant_server.precision import autocast

    cache = EmbeddingCache(torch.device("cpu"), device_entries=1, host_entries=1, store_dir=store)
    all_emb, all_lab = [], []
    counts = {"encoded": 0, "reused": 0}
    todo_total = views * images.shape[0]
    bar = tqdm(total=todo_total, desc="stage-1: augmented views", unit="slice", disable=todo_total == 0)
    for v in range(1, views + 1):
        img, lab = augmented_view(images, labels, v, seed)
        keys = [view_key(im) for im in img]
        emb = torch.empty(img.shape[0], 256, 64, 64, dtype=torch.float16)
        missing = []
        for i, k in enumerate(keys):
            entry = cache.get(k)
            if entry is None:
                missing.append(i)
            else:
                emb[i] = entry.embedding.to(torch.float16)
                counts["reused"] += 1
                bar.update(1)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            x = img[chunk].half().float().to(device)[:, None].expand(-1, 3, -1, -1).contiguous()
            with torch.inference_mode(), autocast(device, cpu_bf16):
                out = (encode_fn or model.encode)(x).float().cpu()
            for j, i in enumerate(chunk):
                cache.put(keys[i], out[j], (256, 256))
                emb[i] = out[j].to(torch.float16)
            counts["encoded"] += len(chunk)
            bar.update(len(chunk))
        all_emb.append(emb)
        all_lab.append(lab.to(torch.uint8))
    bar.close()
    if not views:
        return (
            torch.zeros(0, *images.shape[:1], 256, 64, 64, dtype=torch.float16),
            torch.zeros(0, *labels.shape, dtype=torch.uint8),
            counts,
        )
    return torch.stack(all_emb), torch.stack(all_lab), counts

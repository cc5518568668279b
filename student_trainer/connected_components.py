"""Largest-connected-component cleaning of pseudo-labels (BCP `get_ACDC_2DLargestCC`, for any C).

For every slice and every foreground class, keep only the largest 8-connected component of that class
(skimage's default 2D connectivity, which BCP uses); pixels of the other components become background.
A class absent from a slice stays absent. BCP hard-codes the ACDC classes 1..3; this works for 1..C-1.

Two backends with the same result (up to ties between equally large components):
- `scipy`: `scipy.ndimage.label` per slice and class on the host; used for CPU tensors.
- `torch`: iterative propagation of pixel ids inside each class mask (run-wise max scans plus a 3×3
  max), entirely on the device; used for CUDA tensors, so the training step needs no device-to-host copy
  of the label maps.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

Backend = Literal["auto", "scipy", "torch"]

_EIGHT = np.ones((3, 3), dtype=bool)


def largest_cc_numpy(seg: np.ndarray, num_classes: int) -> np.ndarray:
    """seg (B, H, W) integer -> (B, H, W) same dtype, each foreground class cut to its largest component."""
    out = np.zeros_like(seg)
    for i in range(seg.shape[0]):
        for c in range(1, num_classes):
            comp, n = ndimage.label(seg[i] == c, structure=_EIGHT)
            if n == 0:
                continue
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[i][comp == int(sizes.argmax())] = c
    return out


class _Runs:
    """Run structure of a stack of masks along one axis, computed once per LCC call: `offset` (run index
    × (number of ids + 1), constant along a run) and `end` (the index of the run's last pixel along the
    axis). Then a segmented max over every run is add, cummax, gather, subtract — five kernels a round.
    masks: (N, H, W) bool; dim: -1 (rows) or -2 (columns)."""

    def __init__(self, masks: torch.Tensor, dim: int, big: int) -> None:
        n = masks.shape[dim]
        m = masks.to(torch.int32)
        prev = torch.cat([torch.zeros_like(m.narrow(dim, 0, 1)), m.narrow(dim, 0, n - 1)], dim)
        nxt = torch.cat([m.narrow(dim, 1, n - 1), torch.zeros_like(m.narrow(dim, 0, 1))], dim)
        run = torch.cumsum(m * (1 - prev), dim=dim)  # +1 at each run start
        self.offset = run.to(torch.float64) * big
        shape = [1, 1, 1]
        shape[dim] = n
        pos = torch.arange(n, device=masks.device).view(shape).expand_as(m)
        is_end = (m * (1 - nxt)).bool()
        # index of the first run end at or after each pixel: a reversed cumulative minimum
        cand = torch.where(is_end, pos, torch.full_like(pos, n - 1))
        self.end = torch.flip(torch.cummin(torch.flip(cand, (dim,)), dim=dim).values, (dim,))
        self.dim = dim

    def max(self, lab: torch.Tensor) -> torch.Tensor:
        scanned = torch.cummax(self.offset + lab, dim=self.dim).values
        return torch.gather(scanned, self.dim, self.end) - self.offset


@torch.no_grad()
def largest_cc_torch(seg: torch.Tensor, num_classes: int, check_every: int = 6) -> torch.Tensor:
    """seg (B, H, W) integer tensor on any device -> (B, H, W) same dtype, largest component per class.

    Each pixel of a class mask starts with its own id (flat index + 1). Rounds of: max over horizontal
    runs, max over vertical runs, 3×3 max (the diagonal links of 8-connectivity), all restricted to the
    mask, until nothing changes; then every 8-connected component carries one id (its largest). Rounds
    grow with the number of turns of a component, not its length (a handful for anatomical blobs), and
    each is a dozen kernels (the run structure is computed once). Ids and keys are float64, exact far
    beyond any slice size (keys < (W + 2) * (H*W + 1)). Convergence is checked every `check_every`
    rounds (each check is a host sync). Component sizes come from one scatter-add over all (slice,
    class) planes. Meant for GPUs: on a CPU the scipy backend is much faster.
    """
    b, h, w = seg.shape
    if num_classes <= 1:
        return seg.clone()
    classes = torch.arange(1, num_classes, device=seg.device).view(1, -1, 1, 1)
    k = num_classes - 1
    masks = (seg.unsqueeze(1) == classes).view(b * k, h, w)
    big = h * w + 1
    rows, cols = _Runs(masks, -1, big), _Runs(masks, -2, big)
    ids = torch.arange(1, h * w + 1, device=seg.device, dtype=torch.float64).view(1, h, w)
    zero = torch.zeros((), dtype=torch.float64, device=seg.device)
    lab = torch.where(masks, ids, zero)
    rounds = 0
    while rounds < h * w:  # bound never reached: each round grows some id or nothing changes
        prev = lab
        for _ in range(check_every):  # several rounds per convergence check: one host sync each
            lab = torch.where(masks, rows.max(lab), zero)
            lab = torch.where(masks, cols.max(lab), zero)
            lab = torch.where(masks, F.max_pool2d(lab.unsqueeze(1), 3, stride=1, padding=1).squeeze(1), zero)
        rounds += check_every
        if torch.equal(lab, prev):
            break
    flat = lab.reshape(b * k, h * w).long()
    # component sizes per (slice, class) plane, scattered into a fixed-size buffer (bincount would read
    # the maximum back to the host to size its output)
    counts = torch.zeros(b * k, h * w + 1, dtype=torch.int32, device=seg.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.int32))
    counts[:, 0] = 0
    biggest = counts.argmax(dim=1, keepdim=True)  # 0 when the class is absent
    keep = ((flat == biggest) & (biggest > 0)).view(b, k, h, w)
    cls_map = (keep * classes).sum(dim=1)  # components of different classes never overlap
    return cls_map.to(seg.dtype)


def largest_connected_component(
    seg: torch.Tensor, num_classes: int, backend: Backend = "auto"
) -> torch.Tensor:
    """Keep the largest 8-connected component of each foreground class in each slice.

    seg: (B, H, W) integer label maps (e.g. argmax of the teacher's softmax). Returns the same shape,
    dtype and device. `auto` uses scipy for CPU tensors and the device algorithm for the others.
    """
    if backend == "auto":
        backend = "scipy" if seg.device.type == "cpu" else "torch"
    if backend == "scipy":
        out = largest_cc_numpy(seg.detach().cpu().numpy(), num_classes)
        return torch.from_numpy(out).to(seg.device)
    if backend == "torch":
        return largest_cc_torch(seg, num_classes)
    raise ValueError(f"unknown backend {backend!r}")

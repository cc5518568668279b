"""Connected components of label maps: which classes are single blobs, and keeping only the largest one.

A spurious blob far from the organ costs little Dice but dominates HD95; for a structure that is one
connected piece (a ventricle, a liver, a kidney) the largest component is the structure. Whether a class
is such a structure is read off the labeled exemplars, never assumed: a class whose exemplars show
several pieces (lesions, vessels in cross-section) is left alone.

Two implementations of one cleaning, used on both sides:
- `keep_largest` (scipy, host arrays, 2D or 3D): the assistant's answers, and BCP's pseudo-labels on
  CPU tensors (`largest_cc_numpy`, per slice);
- `largest_cc_torch` / `largest_cc_fixed` (label equivalence on the device, all slices and classes at
  once): BCP's pseudo-labels on CUDA tensors, without a device-to-host copy; the fixed-round form has
  no host sync, as a captured CUDA graph needs.
`largest_connected_component` picks one by the tensor's device (BCP `get_ACDC_2DLargestCC`, any C).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def largest_component_fraction(mask: np.ndarray) -> float:
    """Share of a binary mask's pixels in its largest connected component (1.0 for an empty mask)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return 1.0
    sizes = np.bincount(labels.ravel())[1:]
    return float(sizes.max() / sizes.sum())


def single_component_classes(
    labels: torch.Tensor | np.ndarray, class_ids: list[int], min_share: float = 0.95, min_slices: float = 0.9
) -> list[int]:
    """Classes whose exemplars are single components.

    labels: (N, H, W) integer label maps of the exemplars. A class qualifies when, in at least
    `min_slices` of the exemplars that show it, its largest component holds `min_share` of its pixels.
    """
    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    keep = []
    for c in class_ids:
        shares = [largest_component_fraction(lab == c) for lab in arr if (lab == c).any()]
        if shares and np.mean([s >= min_share for s in shares]) >= min_slices:
            keep.append(int(c))
    return keep


def keep_largest(label: np.ndarray, class_ids: list[int], keep_share: float = 1.0) -> np.ndarray:
    """label: (H, W) or (D, H, W) integer map; for each class in `class_ids` only its largest connected
    component (full connectivity: in 3D, slices touching at an edge or corner count as connected) keeps
    the class, the rest becomes background. With `keep_share` < 1 every component at least that share
    of the largest one's size is kept too (a class confused with a neighbour can make the wrong blob the
    largest: keeping both costs Dice, dropping the right one costs all of it). Returns a new array of
    the same dtype."""
    out = label.copy()
    structure = ndimage.generate_binary_structure(label.ndim, label.ndim)
    for c in class_ids:
        mask = label == c
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=structure)
        if n <= 1:
            continue
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        if keep_share >= 1.0:
            out[mask & (comp != sizes.argmax())] = 0
        else:
            keep = np.flatnonzero(sizes >= keep_share * sizes.max())
            out[mask & ~np.isin(comp, keep)] = 0
    return out


# ---------------------------------------------------------------------- batched (BCP's pseudo-labels)
Backend = Literal["auto", "scipy", "torch"]


def largest_cc_numpy(seg: np.ndarray, num_classes: int) -> np.ndarray:
    """seg (B, H, W) integer -> (B, H, W) same dtype, each foreground class cut to its largest component
    (8-connected: `keep_largest` per slice); values outside 1..num_classes-1 become background."""
    fg = np.where((seg > 0) & (seg < num_classes), seg, 0).astype(seg.dtype)
    classes = list(range(1, num_classes))
    return np.stack([keep_largest(s, classes) for s in fg]) if len(fg) else fg


@torch.no_grad()
def largest_cc_torch(
    seg: torch.Tensor, num_classes: int, rounds_per_check: int = 4, fixed_rounds: int | None = None
) -> torch.Tensor:
    """seg (B, H, W) integer tensor on any device -> (B, H, W) same dtype, largest component per class.

    Label equivalence (Kalentev et al. 2011), with max instead of min, on all (slice, class) planes at
    once. Every pixel of a class mask starts with its own id (flat index + 1); an id also names the pixel
    that owns it, its representative. A round: (1) each pixel reads the largest label among its 8
    neighbours in the mask (a 3×3 max); (2) that value is written to the representative of the pixel's
    label (scatter-amax), merging the two labels' classes; (3) two pointer jumps (label := the label of
    its representative) spread the merge. Labels only grow and stay ids of pixels of their own
    component, so at the fixed point every 8-connected component carries one label, its largest id.
    ACDC-like label maps need 4 rounds, smooth random blobs 6 (the old run-scan propagation needed
    about 30 on the same maps).

    The loop runs `rounds_per_check` rounds without looking, then checks that no pixel has a larger
    neighbour (one host sync); typical maps stop at the first check. Labels are float32 (exact ids up to
    2**24 pixels a slice), since max pooling wants floats. Component sizes come from one scatter-add
    over all planes into a fixed-size buffer (bincount would read its size back to the host).

    `fixed_rounds`: run exactly that many rounds and never check (no host sync at all, the same kernels
    every call: what a captured CUDA graph needs); `largest_cc_fixed` also says whether they sufficed.
    """
    return _largest_cc(seg, num_classes, rounds_per_check, fixed_rounds)[0]


@torch.no_grad()
def largest_cc_fixed(
    seg: torch.Tensor, num_classes: int, rounds: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """`largest_cc_torch` with exactly `rounds` rounds and no host sync. Returns (cleaned map, converged):
    `converged` is a 0-dim bool tensor on the device, False when some pixel still had a larger
    neighbour after the last round (its component was then cut to the part that had merged; the
    caller counts these on the device and reads the count when it logs)."""
    out, converged = _largest_cc(seg, num_classes, 4, rounds)
    assert converged is not None
    return out, converged


def _largest_cc(
    seg: torch.Tensor, num_classes: int, rounds_per_check: int, fixed_rounds: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, h, w = seg.shape
    if num_classes <= 1:
        return seg.clone(), torch.ones((), dtype=torch.bool, device=seg.device)
    if h * w >= 2**24:
        raise ValueError(f"slices of {h}x{w} pixels exceed the exact float32 id range")
    classes = torch.arange(1, num_classes, device=seg.device).view(1, -1, 1, 1)
    k = num_classes - 1
    planes = b * k
    masks = (seg.unsqueeze(1) == classes).view(planes, h * w)
    ids = torch.arange(1, h * w + 1, device=seg.device, dtype=torch.float32).view(1, -1)
    zero = torch.zeros((), dtype=torch.float32, device=seg.device)
    lab = torch.where(masks, ids, zero)

    def neighbour_max(lab: torch.Tensor) -> torch.Tensor:
        return torch.where(masks, F.max_pool2d(lab.view(planes, 1, h, w), 3, 1, 1).view(planes, h * w), zero)

    def representative(lab: torch.Tensor) -> torch.Tensor:  # flat index of the pixel owning each label
        return (lab - 1).clamp_(min=0).long()

    def one_round(lab: torch.Tensor) -> torch.Tensor:
        lab = lab.scatter_reduce(1, representative(lab), neighbour_max(lab), reduce="amax")
        for _ in range(2):
            lab = torch.where(masks, lab.gather(1, representative(lab)), zero)
        return lab

    converged: torch.Tensor | None = None
    if fixed_rounds is not None:
        for _ in range(fixed_rounds):
            lab = one_round(lab)
        converged = (neighbour_max(lab) == lab).all()
    else:
        for _ in range(h * w):  # bound never reached: each pass merges labels or stops
            for _ in range(rounds_per_check):
                lab = one_round(lab)
            if torch.equal(neighbour_max(lab), lab):
                break
    flat = lab.long()
    counts = torch.zeros(planes, h * w + 1, dtype=torch.int32, device=seg.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.int32))
    counts[:, 0] = 0
    biggest = counts.argmax(dim=1, keepdim=True)  # 0 when the class is absent
    keep = ((flat == biggest) & (biggest > 0)).view(b, k, h, w)
    cls_map = (keep * classes).sum(dim=1)  # components of different classes never overlap
    return cls_map.to(seg.dtype), converged


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

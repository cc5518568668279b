"""Connected components of label maps: which classes are single blobs, and keeping only the largest one.

A spurious blob far from the organ costs little Dice but dominates HD95; for a structure that is one
connected piece (a ventricle, a liver, a kidney) the largest component is the structure. Whether a class
is such a structure is read off the labeled exemplars, never assumed: a class whose exemplars show
several pieces (lesions, vessels in cross-section) is left alone.
"""

from __future__ import annotations

import numpy as np
import torch
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

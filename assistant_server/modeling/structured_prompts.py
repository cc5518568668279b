"""Structured prompts: boxes and points derived from a soft class map, and their SAM-style embedding.

Every prompt set has the same number of sparse slots (box corners, one positive and one negative point)
so that all (slice, class) pairs of a batch go through the decoder together; a missing or dropped
prompt fills its slots with SAM's "not a point" embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Codes of a sparse slot, matching SAM's point_embeddings table (0 negative, 1 positive, 2/3 box corners).
NOT_A_POINT, NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3
NUM_SPARSE_SLOTS = 4  # box (2 corners), positive point, negative point


@dataclass
class SparsePrompts:
    """coords: (N, P, 2) float (x, y) in pixels of the 256×256 input; labels: (N, P) long slot codes."""

    coords: torch.Tensor
    labels: torch.Tensor

    def drop(self, keep: torch.Tensor) -> SparsePrompts:
        """keep: (N, P) bool; dropped slots become NOT_A_POINT."""
        return SparsePrompts(
            self.coords, torch.where(keep, self.labels, torch.full_like(self.labels, NOT_A_POINT))
        )


def boxes_from_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """masks: (N, H, W) bool → boxes (N, 4) float x0, y0, x1, y1 (inclusive pixels) and valid (N,) bool."""
    n, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (N, H), (N, W)
    valid = rows.any(dim=1)
    y0 = rows.float().argmax(dim=1)
    y1 = h - 1 - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = w - 1 - cols.flip(1).float().argmax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float(), valid


def _argmax_xy(score: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """score: (N, h, w) → (x, y) pixel centres (N, 2) in the 256-grid, and the max value (N,)."""
    n, h, w = score.shape
    value, idx = score.flatten(1).max(dim=1)
    xy = torch.stack([idx % w, idx // w], dim=1).float() * scale + (scale - 1) / 2
    return xy, value


def derive_prompts(
    class_maps: torch.Tensor, other_maps: torch.Tensor, threshold: float = 0.5, min_negative: float = 0.3
) -> SparsePrompts:
    """Box and points for each (slice, class) from soft maps.

    class_maps: (N, 256, 256) probability of the class; other_maps: (N, 256, 256) max probability of the
    other foreground classes. The box bounds class_maps > threshold; the positive point is the most
    confident interior point; the negative point is the most confident other-class point near the box.
    """
    n, size, _ = class_maps.shape
    boxes, box_valid = boxes_from_masks(class_maps > threshold)
    # Points are searched on a 64×64 grid: 16× less work, 4-pixel precision is plenty for a prompt.
    small = F.avg_pool2d(class_maps[:, None], 4)[:, 0]
    other_small = F.avg_pool2d(other_maps[:, None], 4)[:, 0]
    smooth = F.avg_pool2d(small[:, None], 5, stride=1, padding=2, count_include_pad=False)[:, 0]
    pos_xy, pos_val = _argmax_xy(smooth, 4.0)
    # Negative points: inside the box grown by a quarter of its size, where another class is confident.
    g = small.shape[-1]
    grid = torch.arange(g, device=class_maps.device, dtype=torch.float32) * 4 + 1.5
    margin = ((boxes[:, 2:] - boxes[:, :2]) * 0.25 + 8).repeat(1, 2) * torch.tensor(
        [-1, -1, 1, 1], device=boxes.device
    )
    grown = boxes + margin
    inside_x = (grid[None] >= grown[:, 0:1]) & (grid[None] <= grown[:, 2:3])  # (N, g)
    inside_y = (grid[None] >= grown[:, 1:2]) & (grid[None] <= grown[:, 3:4])
    near = (inside_y[:, :, None] & inside_x[:, None, :]).float()
    neg_xy, neg_val = _argmax_xy(other_small * (1 - small) * near, 4.0)

    coords = torch.stack([boxes[:, :2], boxes[:, 2:], pos_xy, neg_xy], dim=1)  # (N, 4, 2)
    labels = torch.stack(
        [
            torch.where(box_valid, BOX_TOP_LEFT, NOT_A_POINT),
            torch.where(box_valid, BOX_BOTTOM_RIGHT, NOT_A_POINT),
            torch.where(pos_val > threshold * 0.5, POSITIVE, NOT_A_POINT),
            torch.where((neg_val > min_negative) & box_valid, NEGATIVE, NOT_A_POINT),
        ],
        dim=1,
    ).long()
    return SparsePrompts(coords=coords, labels=labels)


def embed_sparse(prompt_encoder: nn.Module, prompts: SparsePrompts) -> torch.Tensor:
    """SAM's point/box embedding for fixed-size prompt sets. Returns (N, P, 256).

    Same arithmetic as SAM's PromptEncoder._embed_points/_embed_boxes (random-Fourier position code of
    the pixel centre plus a learned type embedding; "not a point" slots get only their own embedding),
    written without in-place indexing so it batches and differentiates cleanly.
    """
    pe = prompt_encoder.pe_layer.forward_with_coords(prompts.coords + 0.5, prompt_encoder.input_image_size)
    table = torch.stack([e.weight[0] for e in prompt_encoder.point_embeddings])  # (4, 256)
    typed = pe + table[prompts.labels.clamp_min(0)]
    none = prompt_encoder.not_a_point_embed.weight[0].expand_as(typed)
    return torch.where((prompts.labels >= 0)[..., None], typed, none)

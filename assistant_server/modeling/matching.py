"""Matching a query slice to its templates: prototypes, dense similarity and label transfer.

All three work in a small learned key space on top of the frozen encoder's features, at a coarser grid
than the embedding (32×32 instead of 64×64) so that query→template attention stays cheap:
1,024 query positions against K×1,024 template positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MatchResult:
    """prior: (B, C, G, G) soft label map carried over from the templates (sums to 1 over C);
    similarity: (B, C, G, G) cosine similarity of each query position to each class prototype;
    prototypes: (B, C, D) unit-norm class prototypes in key space; present: (B, C) bool, whether any
    template of the query shows the class."""

    prior: torch.Tensor
    similarity: torch.Tensor
    prototypes: torch.Tensor
    present: torch.Tensor


class TemplateMatcher(nn.Module):
    """Projects encoder features to keys and matches a query against its K templates.

    Arguments:
      embed_dim: channels of the encoder embedding (256 for LiteMedSAM).
      key_dim: channels of the key space.
      grid: side of the matching grid (the 64×64 embedding is average-pooled to it).
      use_label_transfer: when False the prior is a softmax over prototype similarities instead of
        query→template attention (an ablation switch).
    """

    def __init__(
        self, embed_dim: int = 256, key_dim: int = 64, grid: int = 32, use_label_transfer: bool = True
    ):
        super().__init__()
        self.grid = grid
        self.use_label_transfer = use_label_transfer
        self.key = nn.Sequential(
            nn.Conv2d(embed_dim, 128, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(128, key_dim, kernel_size=1),
        )
        # Temperatures of the attention and of the similarity softmax, learned in log space.
        self.log_tau_transfer = nn.Parameter(torch.tensor(math.log(0.07)))
        self.log_tau_similarity = nn.Parameter(torch.tensor(math.log(0.1)))

    def keys(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings: (N, 256, 64, 64) → unit-norm keys (N, D, G, G)."""
        pooled = F.adaptive_avg_pool2d(embeddings, self.grid)
        return F.normalize(self.key(pooled), dim=1)

    def label_grid(self, onehot: torch.Tensor) -> torch.Tensor:
        """onehot: (N, C, H, W) float → class fractions per grid cell (N, C, G, G) (area pooling)."""
        return F.adaptive_avg_pool2d(onehot, self.grid)

    def forward(
        self, query_keys: torch.Tensor, template_keys: torch.Tensor, template_labels: torch.Tensor
    ) -> MatchResult:
        """query_keys: (B, D, G, G); template_keys: (B, K, D, G, G); template_labels: (B, K, C, G, G)
        class fractions per cell. Returns a MatchResult."""
        b, k, d, g, _ = template_keys.shape
        c = template_labels.shape[2]
        q = query_keys.flatten(2).transpose(1, 2)  # (B, G*G, D)
        t = template_keys.permute(0, 1, 3, 4, 2).reshape(b, k * g * g, d)  # (B, K*G*G, D)
        lab = template_labels.permute(0, 1, 3, 4, 2).reshape(b, k * g * g, c)  # (B, K*G*G, C)

        # Prototypes: masked average pooling of template keys per class (over all K templates).
        mass = lab.sum(dim=1)  # (B, C)
        protos = torch.einsum("bnc,bnd->bcd", lab, t) / mass.clamp_min(1e-6)[..., None]
        protos = F.normalize(protos, dim=-1)
        present = mass > 1e-3
        similarity = torch.einsum("bqd,bcd->bcq", q, protos).reshape(b, c, g, g)

        if self.use_label_transfer:
            # Each query position attends to every template position; labels travel with the attention.
            attn = torch.softmax(
                (q @ t.transpose(1, 2)) / self.log_tau_transfer.exp(), dim=-1
            )  # (B, GG, KGG)
            prior = (attn @ lab).transpose(1, 2).reshape(b, c, g, g)
        else:
            logits = similarity / self.log_tau_similarity.exp()
            logits = logits.masked_fill(~present[..., None, None], -1e4)
            prior = torch.softmax(logits, dim=1)
        return MatchResult(prior=prior, similarity=similarity, prototypes=protos, present=present)

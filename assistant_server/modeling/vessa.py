"""VESSA: a reference-guided, prompt-to-mask segmenter on top of LiteMedSAM.

Read top to bottom: a query's frozen image embedding is matched against its templates (matching.py),
which gives per-class prototypes, a dense similarity map and a soft label prior carried over from the
template labels; those become structured prompts per class (structured_prompts.py: box, positive and
negative points, a dense mask prompt, and two semantic tokens — the class prototype and the class's
text embedding); SAM's mask decoder, initialised from LiteMedSAM, turns each (slice, class) prompt set
into mask logits and a predicted IoU. The model is class-agnostic: a class is whatever its templates and
its text say, so one checkpoint serves any class table with which it was trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from assistant_server.modeling.foundation import (
    EMBED_DIM,
    IMAGE_SIZE,
    build_foundation,
    build_tiny_foundation,
)
from assistant_server.modeling.matching import MatchResult, TemplateMatcher
from assistant_server.modeling.structured_prompts import SparsePrompts, derive_prompts, embed_sparse

TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence embeddings


@dataclass
class VessaConfig:
    """Architecture switches; saved in every checkpoint."""

    encoder: str = "litemedsam"  # or "tiny": a fast stand-in for tests (see foundation.TinyEncoder)
    key_dim: int = 64
    grid: int = 32
    num_templates: int = 4
    use_text_tokens: bool = True
    use_label_transfer: bool = True
    use_iou_head: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptDropout:
    """Training-time probabilities of removing each kind of prompt (per slice and class)."""

    box: float = 0.0
    points: float = 0.0
    mask: float = 0.0
    text: float = 0.0


@dataclass
class VessaOutput:
    """logits: (B, M, 256, 256) mask logits for the M requested classes; iou: (B, M) predicted IoU,
    raw; confidence: (B, M) in [0, 1]; match: the MatchResult (prior at the matching grid)."""

    logits: torch.Tensor
    iou: torch.Tensor
    confidence: torch.Tensor
    match: MatchResult
    extras: dict = field(default_factory=dict)


class VessaModel(nn.Module):
    def __init__(self, config: VessaConfig | None = None, foundation: nn.Module | None = None):
        super().__init__()
        self.config = config or VessaConfig()
        if foundation is None:
            if self.config.encoder not in ("litemedsam", "tiny"):
                raise ValueError(f"unknown encoder {self.config.encoder!r}: use 'litemedsam' or 'tiny'")
            foundation = build_tiny_foundation() if self.config.encoder == "tiny" else build_foundation()
        self.image_encoder = foundation.image_encoder
        self.prompt_encoder = foundation.prompt_encoder
        self.mask_decoder = foundation.mask_decoder
        self.matcher = TemplateMatcher(
            EMBED_DIM, self.config.key_dim, self.config.grid, self.config.use_label_transfer
        )
        # Semantic tokens: the class prototype and the class's text, as two extra sparse tokens.
        self.prototype_token = nn.Linear(self.config.key_dim, EMBED_DIM)
        self.text_token = nn.Linear(TEXT_DIM, EMBED_DIM)
        for layer in (self.prototype_token, self.text_token):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        # Extra dense cues (prior, similarity, student map, has-student flag) next to SAM's mask prompt;
        # the last layer starts at zero so training begins from LiteMedSAM's own behaviour.
        self.dense_cues = nn.Sequential(
            nn.Conv2d(4, 16, kernel_size=4, stride=4),
            nn.GELU(),
            nn.Conv2d(16, EMBED_DIM, kernel_size=1),
        )
        nn.init.zeros_(self.dense_cues[-1].weight)
        nn.init.zeros_(self.dense_cues[-1].bias)

    # ----------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, 256, 256) in [0, 1] → image embeddings (B, 256, 64, 64)."""
        return self.image_encoder(images)

    def template_keys(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Template embeddings (N, 256, 64, 64) → keys (N, D, G, G); cached by the bank per model."""
        return self.matcher.keys(embeddings)

    # ----------------------------------------------------------------------------------------------
    def forward(
        self,
        query_embeddings: torch.Tensor,
        template_keys: torch.Tensor,
        template_labels: torch.Tensor,
        text_embeddings: torch.Tensor,
        class_ids: list[int],
        student_probs: torch.Tensor | None = None,
        sparse_prompts: SparsePrompts | None = None,
        mask_prompt: torch.Tensor | None = None,
        dropout: PromptDropout | None = None,
        mask_decoder_fn: Callable | None = None,
    ) -> VessaOutput:
        """Predict masks for the foreground classes `class_ids` of each query slice.

        query_embeddings: (B, 256, 64, 64); template_keys: (B, K, D, G, G); template_labels: (B, K, C, G, G)
        class fractions of each template; text_embeddings: (C, 384); student_probs: (B, C, 256, 256)
        softmax over all C classes or None (templates-only); sparse_prompts: explicit prompts for the
        B×M (slice, class) pairs, slice-major, replacing the derived ones; mask_prompt: (B, M, 256, 256)
        explicit dense prompt probabilities; mask_decoder_fn: (image embeddings (N, 256, 64, 64), sparse
        (N, T, 256), dense (N, 256, 64, 64)) → masks (N, 1, 256, 256), iou (N, 1), in place of SAM's
        decoder (an inference engine: assistant_server/engines), None: the PyTorch module.
        """
        b = query_embeddings.shape[0]
        m = len(class_ids)
        ids = torch.as_tensor(class_ids, device=query_embeddings.device)
        match = self.matcher(self.matcher.keys(query_embeddings), template_keys, template_labels)
        prior = F.interpolate(match.prior, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
        similarity = F.interpolate(match.similarity, size=IMAGE_SIZE, mode="bilinear", align_corners=False)

        # The map that prompts come from: the student's when it is there, else the template prior.
        source = student_probs if student_probs is not None else prior
        has_student = student_probs is not None
        fg = source[:, 1:]
        class_maps = source[:, ids]  # (B, M, H, W)
        if mask_prompt is not None:
            class_maps = mask_prompt
        # Max over the other foreground classes: background is class 0, so index c-1 in fg.
        others = fg.unsqueeze(1).expand(-1, m, -1, -1, -1).clone()
        others[:, torch.arange(m), ids - 1] = 0
        other_maps = others.amax(dim=2)  # (B, M, H, W)

        n = b * m
        if sparse_prompts is None:
            sparse_prompts = derive_prompts(
                class_maps.reshape(n, IMAGE_SIZE, IMAGE_SIZE), other_maps.reshape(n, IMAGE_SIZE, IMAGE_SIZE)
            )
        drop = dropout or PromptDropout()
        if self.training and (drop.box or drop.points):
            keep_box = torch.rand(n, 1, device=ids.device) >= drop.box
            keep_pts = torch.rand(n, 2, device=ids.device) >= drop.points
            sparse_prompts = sparse_prompts.drop(torch.cat([keep_box, keep_box, keep_pts], dim=1))
        sparse = embed_sparse(self.prompt_encoder, sparse_prompts)  # (N, 4, 256)

        # Semantic tokens.
        proto = match.prototypes[:, ids].reshape(n, -1)  # (N, D)
        tokens = [sparse, self.prototype_token(proto)[:, None]]
        if self.config.use_text_tokens:
            text = self.text_token(text_embeddings[ids].to(proto.dtype))  # (M, 256)
            text = text[None].expand(b, -1, -1).reshape(n, 1, -1)
            if self.training and drop.text:
                text = text * (torch.rand(n, 1, 1, device=ids.device) >= drop.text)
            tokens.append(text)
        sparse_embeddings = torch.cat(tokens, dim=1)

        # Dense prompt: SAM's mask encoder on the class map (as logits) plus the extra cues.
        flat_maps = class_maps.reshape(n, 1, IMAGE_SIZE, IMAGE_SIZE)
        mask_logits = torch.logit(flat_maps.float().clamp(1e-4, 1 - 1e-4)).to(flat_maps.dtype)
        dense = self.prompt_encoder.mask_downscaling(mask_logits)
        cues = torch.cat(
            [
                prior[:, ids].reshape(n, 1, IMAGE_SIZE, IMAGE_SIZE),
                similarity[:, ids].reshape(n, 1, IMAGE_SIZE, IMAGE_SIZE),
                flat_maps if has_student else torch.zeros_like(flat_maps),
                torch.full_like(flat_maps, 1.0 if has_student else 0.0),
            ],
            dim=1,
        )
        dense = dense + self.dense_cues(cues)
        if self.training and drop.mask:
            keep = (torch.rand(n, 1, 1, 1, device=ids.device) >= drop.mask).to(dense.dtype)
            no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            dense = dense * keep + no_mask * (1 - keep)

        # SAM's mask decoder on every (slice, class) pair; the slice's embedding is shared by its classes.
        image_embeddings = query_embeddings.repeat_interleave(m, dim=0)
        dtype = image_embeddings.dtype
        if mask_decoder_fn is not None:
            masks, iou = mask_decoder_fn(image_embeddings, sparse_embeddings.to(dtype), dense.to(dtype))
        else:
            masks, iou = self.mask_decoder.predict_masks(
                image_embeddings=image_embeddings,
                image_pe=self.prompt_encoder.get_dense_pe().to(dtype),
                sparse_prompt_embeddings=sparse_embeddings.to(dtype),
                dense_prompt_embeddings=dense.to(dtype),
            )
        logits = masks[:, 0].reshape(b, m, IMAGE_SIZE, IMAGE_SIZE)
        iou = iou[:, 0].reshape(b, m)
        if self.config.use_iou_head:
            confidence = iou.float().clamp(0, 1)
        else:
            # Without the IoU head: the mean probability over the predicted mask.
            p = torch.sigmoid(logits.float())
            fgm = (p > 0.5).float()
            confidence = (p * fgm).sum((2, 3)) / fgm.sum((2, 3)).clamp_min(1)
        return VessaOutput(logits=logits, iou=iou, confidence=confidence, match=match)


def combine_classes(logits: torch.Tensor) -> torch.Tensor:
    """Per-class mask logits (B, M, H, W) → probabilities over background + M classes (B, 1+M, H, W).

    Background gets a fixed logit of 0, so a pixel is a class exactly where that class's mask logit is
    positive and highest; this is also the multi-class cross-entropy used in training.
    """
    zeros = torch.zeros_like(logits[:, :1])
    return torch.softmax(torch.cat([zeros, logits], dim=1).float(), dim=1)

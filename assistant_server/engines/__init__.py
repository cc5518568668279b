"""Inference engines for the frozen image encoder and the mask decoder, chosen once when an Assistant
is built.

On a CPU the TinyViT encoder is most of a slice's cost in eager PyTorch; OpenVINO runs the same module,
converted, 3-5x as fast (f32-bf16); with the encoder fast, SAM's mask decoder is most of what is left.
`select_encoder` returns what `Assistant.embeddings` calls in place of `model.encode`, and
`select_mask_decoder` what `VessaModel.forward` calls in place of the PyTorch decoder (None: PyTorch):

- "torch": `model.encode` itself (always on a GPU: the GPU path stays PyTorch).
- "openvino": `OpenVINOEncoder`, wrapped so that any failure — the package missing, a conversion error,
  a corrupt cache entry, a call that raises — logs ONE warning and answers with PyTorch from then on.
  A request never fails because of the engine (the decoder likewise).
- "auto": "openvino" on a CPU device when the package imports and the encoder is LiteMedSAM's (the tiny
  test encoder takes milliseconds; converting it buys nothing); "torch" otherwise.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from assistant_server.engines.cache import EngineCacheError, default_cache_dir

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino")
EncodeFn = Callable[[torch.Tensor], torch.Tensor]
DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

__all__ = [
    "ENGINES",
    "DecodeFn",
    "EncodeFn",
    "EngineCacheError",
    "FallbackEncoder",
    "default_cache_dir",
    "engine_name",
    "openvino_available",
    "resolve_engine",
    "select_encoder",
    "select_mask_decoder",
    "stored_embeddings_encoder",
]


def openvino_available() -> bool:
    """Whether `import openvino` can work, without importing it (a blocked import counts as missing)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # sys.modules["openvino"] = None, or a broken package
        return False


def resolve_engine(engine: str, device: torch.device | str, encoder: str = "litemedsam") -> str:
    """'auto' → the engine this device and encoder get; an explicit choice is kept (but a GPU device
    always runs PyTorch)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown encoder engine {engine!r}: use one of {ENGINES}")
    if torch.device(device).type != "cpu":
        return "torch"
    if engine == "auto":
        return "openvino" if encoder == "litemedsam" and openvino_available() else "torch"
    return engine


class FallbackEncoder:
    """An engine with PyTorch behind it (the encoder's or the decoder's: any call signature): the first
    exception from the engine is logged once, the call is answered by PyTorch, and every later call goes
    straight to PyTorch."""

    def __init__(self, engine: Callable, fallback: Callable, name: str, part: str = "encoder"):
        self._engine: Callable | None = engine
        self._fallback = fallback
        self._name = name
        self._part = part
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name if self._engine is not None else "torch"

    def __call__(self, *args):
        engine = self._engine
        if engine is not None:
            try:
                return engine(*args)
            except Exception as exc:
                with self._lock:
                    if self._engine is not None:
                        self._engine = None
                        log.warning(
                            "%s engine %s failed (%s: %s); using PyTorch",
                            self._part,
                            self._name,
                            type(exc).__name__,
                            exc,
                        )
        return self._fallback(*args)


def select_encoder(
    model: torch.nn.Module,
    device: torch.device | str,
    engine: str = "auto",
    batch: int = 4,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
) -> EncodeFn:
    """The function Assistant.embeddings calls (`engine_name` names it for stats). `model` is a
    VessaModel: its `image_encoder` is converted, its `encode` is the fallback. Never raises for an
    engine that cannot be built: one warning, then PyTorch."""
    encoder = getattr(getattr(model, "config", None), "encoder", "litemedsam")
    chosen = resolve_engine(engine, device, encoder)
    if chosen == "torch":
        return model.encode
    try:
        from assistant_server.engines.openvino_encoder import OpenVINOEncoder

        ov_encoder = OpenVINOEncoder(
            model.image_encoder, batch=batch, precision=precision, cache_dir=cache_dir
        )
    except Exception as exc:  # ImportError, conversion error, corrupt cache entry: PyTorch serves
        log.warning("encoder engine %s unavailable (%s: %s); using PyTorch", chosen, type(exc).__name__, exc)
        return model.encode
    return FallbackEncoder(ov_encoder, model.encode, ov_encoder.name)


def stored_embeddings_encoder(
    model: torch.nn.Module, device: torch.device | str, engine: str = "auto", cache_dir: str | Path | None = None
) -> EncodeFn:
    """The encoder for embeddings that are stored and reused (a bank, Stage-1's augmented views, an
    embedding store): the engine at f32 only, whose embeddings match the eager ones to ~1e-5, so a
    bank built on the fast path serves exactly as one built eagerly."""
    return select_encoder(model, device, engine, batch=4, precision="f32", cache_dir=cache_dir)


def select_mask_decoder(
    model: torch.nn.Module,
    device: torch.device | str,
    engine: str = "auto",
    precision: str = "auto",
    cache_dir: str | Path | None = None,
) -> DecodeFn | None:
    """What VessaModel.forward calls in place of SAM's mask decoder, or None for PyTorch. The same
    engine choice as the encoder's ("auto" with the tiny test encoder stays PyTorch; an explicit
    "openvino" converts the decoder, LiteMedSAM's in both). A missing package is silent here (the encoder
    already warned); any other failure: one warning, then PyTorch."""
    encoder = getattr(getattr(model, "config", None), "encoder", "litemedsam")
    chosen = resolve_engine(engine, device, encoder)
    if chosen == "torch" or not openvino_available():
        return None
    try:
        from assistant_server.engines.openvino_decoder import OpenVINOMaskDecoder

        ov_decoder = OpenVINOMaskDecoder(
            model.mask_decoder, model.prompt_encoder.get_dense_pe(), precision=precision, cache_dir=cache_dir
        )
    except Exception as exc:
        log.warning("decoder engine %s unavailable (%s: %s); using PyTorch", chosen, type(exc).__name__, exc)
        return None
    return FallbackEncoder(ov_decoder, _torch_decoder(model), ov_decoder.name, part="decoder")


def _torch_decoder(model: torch.nn.Module) -> DecodeFn:
    """The PyTorch decoder with the engine's call signature (the fallback)."""

    def decode(image_embeddings, sparse, dense):
        masks, iou = model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=model.prompt_encoder.get_dense_pe().to(image_embeddings.dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return masks[:, :1], iou[:, :1]

    return decode


def engine_name(fn: Callable | None) -> str:
    """'torch', or the engine and precision serving now (e.g. 'openvino-bf16')."""
    return getattr(fn, "name", "torch")

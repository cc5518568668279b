"""SAM's mask decoder on OpenVINO's CPU plugin: the same call as `mask_decoder.predict_masks`, for
every (slice, class) pair of a batch at once.

Once the encoder runs on an engine, the decoder is most of what is left of a slice's time (a first pass
and a refinement pass, one decoder call per class: docs/benchmarks.md). It is converted from the PyTorch
module, with dynamic pair and token counts, and with the prompt encoder's dense positional encoding
(`image_pe`, a constant of the weights) folded in; the entry is keyed by the hash of both, so a
fine-tuned decoder never meets an old conversion. Only the first mask token's output is kept: VESSA reads
mask 0 and its IoU. Conversion takes seconds; the cache is shared with the encoder's.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from assistant_server.engines.openvino_runtime import load_or_convert, resolve_precision, save_ir
from assistant_server.modeling.foundation import EMBED_DIM, EMBED_SIZE, state_hash

log = logging.getLogger(__name__)

XML = "decoder.xml"  # and decoder.bin beside it

# Conversions done by this process (tests count them: a cached entry must not convert again).
CONVERSIONS = 0


class _FirstMask(nn.Module):
    """predict_masks with image_pe fixed, keeping mask token 0: (N, 256, 64, 64) image embeddings,
    (N, T, 256) sparse tokens, (N, 256, 64, 64) dense prompt → masks (N, 1, 256, 256), iou (N, 1)."""

    def __init__(self, mask_decoder: nn.Module, image_pe: torch.Tensor):
        super().__init__()
        self.mask_decoder = mask_decoder
        self.register_buffer("image_pe", image_pe.detach().float().clone())

    def forward(self, image_embeddings, sparse, dense):
        masks, iou = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        return masks[:, :1], iou[:, :1]


def decoder_key(mask_decoder: nn.Module, image_pe: torch.Tensor) -> dict:
    """What the converted graph depends on: the decoder's weights and the positional encoding."""
    import openvino as ov

    return {
        "engine": "openvino-decoder",
        "weights": state_hash({**mask_decoder.state_dict(), "image_pe": image_pe.detach().float().cpu()}),
        "module": f"{type(mask_decoder).__module__}.{type(mask_decoder).__qualname__}",
        "openvino": ov.get_version(),
        "torch": torch.__version__,
    }


def _convert(graph: _FirstMask, tokens: int, entry: Path, key: dict) -> None:
    """Trace the decoder with dynamic pairs and tokens; write the IR into a new cache entry atomically."""
    global CONVERSIONS
    import openvino as ov

    n = 2
    example = (
        torch.rand(n, EMBED_DIM, EMBED_SIZE, EMBED_SIZE),
        torch.rand(n, tokens, EMBED_DIM),
        torch.rand(n, EMBED_DIM, EMBED_SIZE, EMBED_SIZE),
    )
    shapes = [[-1, EMBED_DIM, EMBED_SIZE, EMBED_SIZE], [-1, -1, EMBED_DIM], [-1, EMBED_DIM, EMBED_SIZE, EMBED_SIZE]]
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent branches: shapes are dynamic
        ov_model = ov.convert_model(graph, example_input=example, input=shapes)
    save_ir(ov_model, entry, key, XML)
    CONVERSIONS += 1
    log.info("converted the mask decoder to OpenVINO in %.1f s (%s)", time.perf_counter() - t0, entry)


class OpenVINOMaskDecoder:
    """(image_embeddings (N, 256, 64, 64), sparse (N, T, 256), dense (N, 256, 64, 64)) → masks
    (N, 1, 256, 256), iou (N, 1), float32 on the CPU. Raises on any failure: the caller falls back."""

    engine = "openvino"

    def __init__(
        self,
        mask_decoder: nn.Module,
        image_pe: torch.Tensor,
        precision: str = "auto",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        tokens: int = 6,
    ):
        self.precision = resolve_precision(precision)
        self.threads = int(threads or torch.get_num_threads())
        self.key = decoder_key(mask_decoder, image_pe)
        graph = _FirstMask(mask_decoder.eval(), image_pe)
        self.entry, self.compiled, self.converted = load_or_convert(
            self.key, XML, lambda entry: _convert(graph, tokens, entry, self.key), self.precision, self.threads, cache_dir
        )
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request, reused: calls are serialised

    @property
    def name(self) -> str:
        return f"{self.engine}-{self.precision}"

    def __call__(
        self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = [np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()) for t in (image_embeddings, sparse, dense)]
        with self._lock:
            result = self._request.infer(dict(enumerate(inputs)))
            masks = np.array(result[self.compiled.output(0)], dtype=np.float32, copy=True)
            iou = np.array(result[self.compiled.output(1)], dtype=np.float32, copy=True)
        device = image_embeddings.device
        return torch.from_numpy(masks).to(device), torch.from_numpy(iou).to(device)

"""The frozen image encoder on OpenVINO's CPU plugin: the same call as `VessaModel.encode`, 3x faster
than eager PyTorch fp32 with the f32 hint and 5x with bf16 (LiteMedSAM, batch 4, a 2-core AMD EPYC with
other jobs running; numbers in the commit that added it). Converting takes minutes, hence the cache.

The TinyViT encoder is converted from the PyTorch module itself (`openvino.convert_model`), so there is no
second copy of the weights to keep in step. Its trace bakes the batch size into reshapes (`B = len(x)` in
TinyViT), so the model is converted for a fixed batch and a call pads its last chunk. The IR is stored in
fp32; the precision is a compile-time hint (bf16 where the CPU has native bf16 kernels), so one cache
entry serves both precisions.
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
from assistant_server.modeling.foundation import IMAGE_SIZE, module_state_hash

log = logging.getLogger(__name__)

XML = "encoder.xml"  # and encoder.bin beside it

# Conversions done by this process (tests count them: a cached entry must not convert again).
CONVERSIONS = 0


def _convert(module: nn.Module, batch: int, entry: Path, key: dict) -> None:
    """Trace the module at a fixed batch and write the IR into a new cache entry (atomically)."""
    global CONVERSIONS
    import openvino as ov

    example = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about TinyViT's shape asserts: expected
        ov_model = ov.convert_model(module, example_input=example)
    save_ir(ov_model, entry, key, XML)
    CONVERSIONS += 1
    log.info("converted the image encoder to OpenVINO in %.1f s (%s)", time.perf_counter() - t0, entry)


class OpenVINOEncoder:
    """(B, 3, 256, 256) float → (B, 256, 64, 64) float32, on the CPU, in chunks of the converted batch.

    Built from the encoder module; the converted model is read from `cache_dir` when an entry for these
    weights exists, else converted once and stored there. Raises on any failure: the caller falls back."""

    engine = "openvino"

    def __init__(
        self,
        module: nn.Module,
        batch: int = 4,
        precision: str = "auto",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
    ):
        import openvino as ov

        self.batch = int(batch)
        self.precision = resolve_precision(precision)
        self.threads = int(threads or torch.get_num_threads())
        module = module.eval()
        self.key = {
            "engine": self.engine,
            "weights": module_state_hash(module),
            "module": f"{type(module).__module__}.{type(module).__qualname__}",
            "batch": self.batch,
            "openvino": ov.get_version(),
            "torch": torch.__version__,
        }
        self.entry, self.compiled, self.converted = load_or_convert(
            self.key, XML, lambda entry: _convert(module, self.batch, entry, self.key), self.precision, self.threads, cache_dir
        )
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request, reused: calls are serialised

    @property
    def name(self) -> str:
        return f"{self.engine}-{self.precision}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"encoder input must be (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}"
            )
        x = images.detach().to("cpu", torch.float32).numpy()
        out: list[np.ndarray] = []
        with self._lock:
            for start in range(0, n, self.batch):
                chunk = x[start : start + self.batch]
                k = chunk.shape[0]
                if k < self.batch:  # the model has a fixed batch: pad with zeros, drop their outputs
                    chunk = np.concatenate([chunk, np.zeros((self.batch - k, *chunk.shape[1:]), chunk.dtype)])
                result = self._request.infer({0: np.ascontiguousarray(chunk)})
                out.append(np.array(result[self.compiled.output(0)][:k], dtype=np.float32, copy=True))
        return torch.from_numpy(np.concatenate(out)).to(images.device)

"""The image encoder in int8: NNCF's post-training quantization of the converted fp32 IR, calibrated on
the template bank's own exemplar images.

Calibration needs inputs like the ones served: a replica has its bank at hand, so up to
`CALIBRATION_IMAGES` exemplars (seeded choice, sorted by id first) are the calibration set. The int8 IR
is a cache entry of its own, keyed by the fp32 entry's key plus the calibration images' sha256 and
NNCF's version: a new checkpoint or another calibration set quantizes again, a restart does not.
Quantization is `ModelType.TRANSFORMER` (softmax, layer norms and the attention's scores stay in float;
the matmuls and convolutions go int8); what stays float runs at the "auto" hint. Whether the labels
hold is the benchmark's question (benchmarks/cpu_engine.py: Dice and ranking against the eager path).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from assistant_server.engines.openvino_runtime import core, save_ir
from assistant_server.preprocess import encoder_input

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 32  # NNCF's statistics settle well before its default of 300 on a 2-core budget
CALIBRATION_SEED = 0

# Quantizations done by this process (tests count them: a cached int8 entry must not quantize again).
QUANTIZATIONS = 0


def calibration_inputs(images: torch.Tensor | np.ndarray, limit: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """Bank images (N, H, W) → up to `limit` encoder inputs (K, 3, 256, 256) float32, a seeded
    choice (the same bank gives the same set, so the same cache entry)."""
    arr = images.float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    if arr.ndim != 3 or len(arr) == 0:
        raise ValueError(f"int8 calibration needs exemplar images (N, H, W); got shape {arr.shape}")
    pick = np.sort(np.random.default_rng(seed).permutation(len(arr))[:limit])
    return encoder_input(arr[pick]).numpy()


def calibration_digest(inputs: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(inputs, np.float32).tobytes()).hexdigest()


def nncf_version() -> str:
    import nncf

    return nncf.__version__


def _batches(inputs: np.ndarray, batch: int) -> list[np.ndarray]:
    """The calibration set in the IR's fixed batch; a short last chunk is filled by cycling from the
    start (zeros would skew the activation ranges)."""
    n = len(inputs)
    count = max(1, -(-n // batch))
    idx = np.arange(count * batch) % n
    return [np.ascontiguousarray(inputs[idx[i : i + batch]]) for i in range(0, len(idx), batch)]


def quantize_entry(f32_xml: Path, entry: Path, key: dict, inputs: np.ndarray, batch: int, xml_name: str) -> None:
    """Quantize the fp32 IR at `f32_xml` on `inputs` and write it as the cache entry `entry`."""
    global QUANTIZATIONS
    import nncf

    t0 = time.perf_counter()
    batches = _batches(inputs, batch)
    quantized = nncf.quantize(
        core().read_model(str(f32_xml)),
        nncf.Dataset(batches),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(batches),  # NNCF counts dataset items: here batches
    )
    save_ir(quantized, entry, key, xml_name)
    QUANTIZATIONS += 1
    log.info(
        "quantized the image encoder to int8 on %d bank images in %.1f s (%s)",
        len(inputs),
        time.perf_counter() - t0,
        entry,
    )

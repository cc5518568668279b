"""Which labels to look at first: cases ordered from least to most trusted, and `suggest`, the K cases
an expert should label next (low confidence traded against diversity).

Trust is the case's confidence from the manifest (services/labeling/runner.py: the mean over its
classes of the assistant's predicted-IoU confidence on the slices holding the class). Diversity is the
distance between case descriptors: a 16×16 thumbnail of the middle slice (the kind of global
descriptor the template bank keeps per slice, computed here without the encoder) and the case's
label-volume profile, so the picks are not K near-copies of one hard case.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.labeling.outputs import CaseRecord


def ranking(records: dict[str, CaseRecord] | list[CaseRecord]) -> list[dict]:
    """Labeled cases, least trusted first (ties by case id); failed cases are not ranked."""
    recs = list(records.values()) if isinstance(records, dict) else list(records)
    ok = sorted((r for r in recs if r.status == "ok"), key=lambda r: (r.confidence or 0.0, r.case_id))
    out = []
    for i, r in enumerate(ok, 1):
        worst = {n: s.confidence_worst for n, s in r.classes.items()}
        out.append(
            {
                "rank": i,
                "case_id": r.case_id,
                "confidence": r.confidence,
                "worst_class": min(worst, key=lambda n: worst[n] if worst[n] is not None else -1.0) if worst else None,
                "classes": {n: s.confidence_mean for n, s in r.classes.items()},
                "output": r.output,
                **frame_figures(r),
            }
        )
    return out


def frame_figures(rec: CaseRecord) -> dict:
    """A cine's per-frame figures for the ranking: each frame's confidence and the least trusted frame
    (`frames`, `worst_frame`); {} for a 3D case."""
    if not rec.frames:
        return {}
    frames = [{"frame": f.frame, "confidence": f.confidence} for f in rec.frames]
    worst = min(frames, key=lambda f: (f["confidence"] if f["confidence"] is not None else -1.0, f["frame"]))
    return {"frames": frames, "worst_frame": worst["frame"]}


def descriptor(rec: CaseRecord, out: Path) -> np.ndarray:
    """A case's descriptor: the middle slice's 16×16 thumbnail (z-scored) and its label-volume shares."""
    from services.labeling.cases import case_input, read_case
    from shared.data.resize import resize_image

    try:
        vol = read_case(case_input(rec.case_id, Path(rec.input)))
        mid = vol.image[vol.image.shape[0] // 2]
        thumb = resize_image(mid, (16, 16)).ravel()
        thumb = (thumb - thumb.mean()) / (thumb.std() + 1e-6)
    except Exception:
        thumb = np.zeros(256, np.float32)  # the input moved or changed: diversity from the labels alone
    vox = np.array([s.voxels for _, s in sorted(rec.classes.items())], dtype=np.float64)
    shares = vox / vox.sum() if vox.sum() > 0 else vox
    return np.concatenate([thumb / np.sqrt(thumb.size), shares]).astype(np.float64)


def suggest(records: dict[str, CaseRecord], out: Path, k: int, beta: float = 1.0) -> list[dict]:
    """K cases to label next: the least trusted first, then greedily the case maximising
    (1 − confidence) × (distance to the nearest pick / the largest such distance)^beta."""
    ranked = ranking(records)
    if k <= 0 or not ranked:
        return []
    feats = {r["case_id"]: descriptor(records[r["case_id"]], out) for r in ranked}
    doubt = {r["case_id"]: 1.0 - (r["confidence"] or 0.0) for r in ranked}
    picks = [ranked[0]["case_id"]]
    while len(picks) < min(k, len(ranked)):
        rest = [c for c in feats if c not in picks]
        dist = {c: min(float(np.linalg.norm(feats[c] - feats[p])) for p in picks) for c in rest}
        top = max(dist.values()) or 1.0
        picks.append(max(rest, key=lambda c: (doubt[c] * (dist[c] / top) ** beta, -len(c), c)))
    by_id = {r["case_id"]: r for r in ranked}
    return [{**by_id[c], "pick": i + 1} for i, c in enumerate(picks)]

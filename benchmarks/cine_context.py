"""Neighbouring frames in time as context for a 4D cine: per-frame Dice with and without it, on a given
checkpoint and bank (docs/dicom.md, "Neighbours in time").

    python -m benchmarks.cine_context --data CINE_DIR --ckpt assistant.pt --bank bank \
        [--weights 0.1,0.2,0.33] [--device cuda] [--json OUT]

CINE_DIR holds 4D NIfTIs (`<case>.nii.gz`, x y z t) and their 4D ground truth under `truth/` with the
same names: what `vessa data synth OUT --cases N --cine T` writes, or ACDC's `patientXXX_4d.nii.gz` with
a 4D truth made from its labeled frames. Each cine is read as the label runner reads it (min-max over
the whole cine), then every frame goes through `Assistant.predict_volume` in process:

- `plain`: as a job labels it today (the checkpoint's own inference options);
- `refine-own`: a second pass whose dense prompt is the frame's own answer (w = 0: what a refinement
  pass does; it separates the gain of a second pass from the gain of time);
- `time-w`: a second pass whose dense prompt is frame t's answer blended with frames t±1's
  (`shared.data.cine.temporal_prompts`, the cycle taken as periodic), as `volume_context` blends z±1;
  the same second pass a job makes with `temporal_context` w (`vessa label --temporal-context W`).

The prompt goes in as the slice's student prompt, which the assistant already takes (no new model code).
Prints per-variant mean Dice per class and the mean over frames, and per frame, and writes them as
JSON. The tiny test model's numbers mean nothing; run it on a trained checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _frame_answer(assistant, frame, class_ids, prompts=None) -> tuple[np.ndarray, np.ndarray]:
    """One frame through predict_volume → labels (D, H, W) uint8 and probs (D, C, H, W) float32."""
    from assistant_server.assistant import SliceInput

    slices = [
        SliceInput(image=frame.image[z], student_probs=None if prompts is None else prompts[z])
        for z in range(frame.image.shape[0])
    ]
    outs = assistant.predict_volume(slices, class_ids=class_ids, return_probs=True)
    labels = np.stack([o.label for o in outs]).astype(np.uint8)
    probs = np.stack([np.asarray(o.probs, np.float32) for o in outs])
    return labels, probs


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def run(data: Path, ckpt: str, bank: Path, weights: list[float], device: str | None = None, encoder: str = "litemedsam", class_ids: list[int] | None = None) -> dict:
    from assistant_server.assistant import Assistant
    from services.labeling.cases import discover, read_cine_case
    from shared.data.cine import load_cine_labels, temporal_prompts

    assistant = Assistant.from_files(ckpt, bank, device=device, encoder=encoder, answer_cache_entries=0)
    cases = [c for c in discover(Path(data)).cases if c.kind == "cine"]
    if not cases:
        raise SystemExit(f"no 4D cine in {data}")
    ids = class_ids or sorted(c.index for c in assistant.classes if c.index != 0)
    variants = ["plain", "refine-own", *[f"time-{w:g}" for w in weights]]
    per_frame: dict[str, list[dict]] = {v: [] for v in variants}
    seconds: dict[str, float] = dict.fromkeys(variants, 0.0)
    for case in cases:
        truth_path = Path(data) / "truth" / case.path.name
        if not truth_path.is_file():
            raise SystemExit(f"no ground truth {truth_path} for {case.path.name}")
        frames = read_cine_case(case)
        truth = load_cine_labels(truth_path, frames)
        t0 = time.perf_counter()
        first = [_frame_answer(assistant, f, ids) for f in frames]
        t_first = time.perf_counter() - t0
        seconds["plain"] += t_first
        answers = {"plain": [lab for lab, _ in first]}
        probs = [p for _, p in first]
        for v, w in (("refine-own", 0.0), *((f"time-{w:g}", w) for w in weights)):
            t0 = time.perf_counter()
            prompts = temporal_prompts(probs, w)
            answers[v] = [_frame_answer(assistant, f, ids, prompts[t])[0] for t, f in enumerate(frames)]
            seconds[v] += time.perf_counter() - t0 + t_first  # the first pass is part of it
        for v in variants:
            for t, lab in enumerate(answers[v]):
                per_frame[v].append({"case": case.case_id, "frame": t, **{str(k): _dice(lab == k, truth[t] == k) for k in ids}})
    summary = {}
    for v in variants:
        rows = per_frame[v]
        by_class = {str(k): float(np.mean([r[str(k)] for r in rows])) for k in ids}
        summary[v] = {"dice": by_class, "mean": float(np.mean(list(by_class.values()))), "seconds": round(seconds[v], 3)}
    return {"data": str(data), "ckpt": str(ckpt), "bank": str(bank), "cases": len(cases), "frames": len(per_frame["plain"]), "summary": summary, "per_frame": per_frame}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="folder of 4D NIfTIs with truth/ beside them")
    p.add_argument("--ckpt", required=True, help="assistant checkpoint")
    p.add_argument("--bank", type=Path, required=True, help="template bank directory")
    p.add_argument("--weights", default="0.1,0.2,0.33", help="comma-separated weights w of frames t±1 (each in (0, 1/3])")
    p.add_argument("--encoder", default="litemedsam")
    p.add_argument("--device", default=None)
    p.add_argument("--classes", default=None, help="comma-separated class indices (default: the bank's)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    weights = [float(x) for x in args.weights.split(",") if x.strip()]
    if any(not 0.0 < w <= 1 / 3 + 1e-9 for w in weights):
        p.error("each weight must be in (0, 1/3]")
    weights = [min(w, 1 / 3) for w in weights]
    classes = [int(x) for x in args.classes.split(",")] if args.classes else None
    res = run(args.data, args.ckpt, args.bank, weights, args.device, args.encoder, classes)
    names = list(next(iter(res["summary"].values()))["dice"])
    print(f"{res['cases']} cines, {res['frames']} frames; per-frame Dice, mean over frames")
    print("| variant | " + " | ".join(f"class {k}" for k in names) + " | mean | s |")
    print("| --- |" + " ---: |" * (len(names) + 2))
    for v, s in res["summary"].items():
        print(f"| {v} | " + " | ".join(f"{s['dice'][k]:.4f}" for k in names) + f" | {s['mean']:.4f} | {s['seconds']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

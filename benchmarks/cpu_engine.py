"""The encoder engines on the CPU, side by side in one run (issue 30): per engine and precision, the
encoder alone (slices/s, GFLOP/s), the assistant's templates-only labels of a dataset's validation
volumes as a replica computes them (encoder + decoder, one volume at a time: slices/s, the decoder's
share), mean Dice against ground truth, and the agreement with the eager PyTorch path (Dice difference,
Spearman between the two paths' case confidences).

    python -m benchmarks.cpu_engine --ckpt CKPT --data ../shared/data/acdc [--limit N] [--json OUT]

One process, one engine after the other on the same checkpoint, bank and volumes; converted models come
from the engine cache (the first run converts once). docs/benchmarks.md holds the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from assistant_server.assistant import Assistant
from assistant_server.preprocess import encoder_input
from assistant_server.training.evaluate import EvalSettings, _bank_for, evaluate_assistant
from shared.calibration import spearman
from shared.data import open_dataset

ENCODER_GFLOP = 74.9  # LiteMedSAM's TinyViT at 256×256, per slice (docs/performance.md)
CONFIGS = [("torch", "auto"), ("openvino", "f32"), ("openvino", "bf16")]


def _flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    keep = [f for f in flags if f.startswith(("avx2", "avx512", "amx", "avx_vnni"))]
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    return f"{model or platform.processor()}, {torch.get_num_threads()} threads, {' '.join(sorted(keep))}"


def encoder_rate(a: Assistant, images: list[np.ndarray], reps: int) -> float:
    """Slices/s of the encoder alone on batches of `a.encode_batch` real slices (one warm-up call)."""
    x = encoder_input(images[: a.encode_batch], a.device)
    with torch.inference_mode(), a._autocast():
        a.encode_fn(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            a.encode_fn(x)
    return reps * len(x) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--bank", type=Path, default=None, help="the bank (default: the checkpoint's)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="first N volumes (default: all)")
    p.add_argument("--reps", type=int, default=3, help="encoder batches timed per engine")
    p.add_argument("--configs", default=",".join(f"{e}:{q}" for e, q in CONFIGS), help="engine:precision,…")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    configs = [tuple(c.split(":")) for c in args.configs.split(",")]
    ds = open_dataset(args.data)
    first = ds.read_volume(ds.volume_ids(args.split)[0], args.split)
    images = [np.ascontiguousarray(first.image[z]) for z in range(min(8, first.image.shape[0]))]
    bank = _bank_for(EvalSettings(ckpt=args.ckpt, data=args.data, bank=args.bank))
    rows = []
    for engine, precision in configs:
        a = Assistant.from_files(args.ckpt, bank, device="cpu", engine=engine, engine_precision=precision)
        enc = encoder_rate(a, images, args.reps)
        served = a.stats().get("encoder_engine", engine)
        del a
        s = EvalSettings(ckpt=args.ckpt, data=args.data, bank=bank, split=args.split, limit=args.limit, device="cpu",
                         modes=("templates",), engine=engine, engine_precision=precision)  # fmt: skip
        rep = evaluate_assistant(s)
        st = rep["assistant_stats"]
        vols = rep["per_volume"]["templates"]
        rows.append(
            {
                "engine": served,
                "encoder_slices_per_s": enc,
                "encoder_gflops": enc * ENCODER_GFLOP,
                "label_slices_per_s": st["slices"] / rep["seconds"],
                "decoder_slices_per_s": st["slices"] / st["decoder_s"] if st["decoder_s"] else float("nan"),
                "decoder_share": st["decoder_s"] / rep["seconds"],
                "mean_dice": rep["summary"]["templates"]["mean"]["dice"] * 100,
                "volumes": rep["volumes"],
                "slices": st["slices"],
                "case_confidence": [v["confidence"]["mean"] for v in vols],
                "case_dice": [float(np.mean([c["dice"] for c in v["classes"].values()])) * 100 for v in vols],
            }
        )
        print(f"{served}: {rows[-1]['label_slices_per_s']:.3f} slices/s, Dice {rows[-1]['mean_dice']:.2f}", flush=True)
    base = rows[0]
    for r in rows:
        r["speedup_label"] = r["label_slices_per_s"] / base["label_slices_per_s"]
        r["speedup_encoder"] = r["encoder_slices_per_s"] / base["encoder_slices_per_s"]
        r["dice_minus_eager"] = r["mean_dice"] - base["mean_dice"]
        r["spearman_vs_eager"] = spearman(r["case_confidence"], base["case_confidence"])
    print(table(rows, _flags(), args))
    if args.json:
        args.json.write_text(json.dumps({"machine": _flags(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1, default=float))
    return 0


def table(rows: list[dict], machine: str, args) -> str:
    out = [f"CPU engines — {machine}; {rows[0]['volumes']} {args.split} volumes, {rows[0]['slices']} slices",
           "engine         enc sl/s  enc GFLOP/s  enc ×   label sl/s  label ×  dec share  Dice    ΔDice  Spearman"]  # fmt: skip
    for r in rows:
        out.append(
            f"{r['engine']:<14} {r['encoder_slices_per_s']:8.2f} {r['encoder_gflops']:12.1f} {r['speedup_encoder']:5.2f}"
            f" {r['label_slices_per_s']:11.3f} {r['speedup_label']:8.2f} {r['decoder_share']:9.0%} {r['mean_dice']:6.2f}"
            f" {r['dice_minus_eager']:+7.2f} {r['spearman_vs_eager']:9.3f}"
        )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())

"""torch threads on the CPU, side by side in one run: the encoder (bank builds, augmented views,
cold pseudo-labels) and Stage-1 steps with 1 thread against every core.

    python -m benchmarks.cpu_threads [--threads 1,2] [--steps 8] [--json OUT]

On some 2-vCPU VMs two torch threads are slower than one (the vCPUs share a core, or the host steals
one): the Stage-1 recipe then runs faster with `train.threads: 1`. Results go to docs/benchmarks.md
("torch threads on the CPU"). The assistant is LiteMedSAM with untrained VESSA parts (speed does not
depend on weight values), the bank 2 synthetic patients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def _encoder_s_per_slice(model: torch.nn.Module, reps: int) -> float:
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        model(x)  # lazy initialisation, not timed
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
    return (time.perf_counter() - t0) / reps


def _stage1_s_per_step(bank: Path, out: Path, steps: int, threads: int) -> float:
    from assistant_server.training.stage1 import Stage1Settings, train_stage1

    s = Stage1Settings(
        bank=bank, out=out, steps=steps, batch_size=2, threads=threads, device="cpu", save_every=10**6, log_every=10**6
    )
    t0 = time.perf_counter()
    train_stage1(s)
    return (time.perf_counter() - t0) / steps  # includes model set-up: the same for every row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="comma-separated thread counts")
    p.add_argument("--reps", type=int, default=6, help="encoder calls timed per row")
    p.add_argument("--steps", type=int, default=8, help="Stage-1 steps timed per row")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    counts = [int(x) for x in args.threads.split(",")]

    from assistant_server.bank_builder import build_bank
    from assistant_server.modeling.foundation import build_foundation
    from shared.data.synth import write_msd_dataset

    work = Path(tempfile.mkdtemp(prefix="vessa-threads-"))
    write_msd_dataset(work / "synth", cases=6, seed=0)
    build_bank(work / "synth", 2, work / "bank", device="cpu")
    encoder = build_foundation().image_encoder.eval()

    rows: dict[str, dict[str, float]] = {}
    for n in counts:
        torch.set_num_threads(n)
        rows[str(n)] = {
            "encoder_s_per_slice": _encoder_s_per_slice(encoder, args.reps),
            "stage1_s_per_step": _stage1_s_per_step(work / "bank", work / f"s1-{n}" / "a.pt", args.steps, n),
        }
    base = rows[str(counts[0])]
    res = {
        "rows": rows,
        "ratio_to_first": {k: {m: v[m] / base[m] for m in v} for k, v in rows.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(f"{'threads':>8s} {'encoder s/slice':>16s} {'Stage-1 s/step':>15s}  (ratio to {counts[0]} thread(s))")
    for k, v in rows.items():
        r = res["ratio_to_first"][k]
        print(
            f"{k:>8s} {v['encoder_s_per_slice']:16.3f} {v['stage1_s_per_step']:15.3f}  "
            f"({r['encoder_s_per_slice']:.2f}, {r['stage1_s_per_step']:.2f})"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Encoder and decoder batch size on the CPU, side by side in one run: seconds per slice and peak memory
of pseudo-labeling one 16-slice volume from nothing (encoder + decoder, as `vessa assistant eval`,
`vessa assistant pseudo-bank` and a CPU replica do), one subprocess per batch size so each peak is its own.

    python -m benchmarks.cpu_encode_batch [--batches 16,8,4,1] [--slices 16] [--json OUT]

Results go to docs/benchmarks.md ("Encoder batch size on the CPU"). The assistant is LiteMedSAM with
untrained VESSA parts (speed does not depend on weight values), the bank 2 synthetic patients.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(bank: str, batch: int, slices: int) -> dict:
    """In this process: the assistant on a random volume of `slices` slices, twice (cold, then warm)."""
    import numpy as np

    from assistant_server.assistant import Assistant, SliceInput
    from assistant_server.cpu_memory import keep_freed_memory

    a = Assistant.from_files("pretrained", bank, device="cpu", encode_batch=batch, answer_cache_entries=0)
    keep_freed_memory(a.device)
    rng = np.random.default_rng(0)
    for _rep in range(2):  # new images each time: every slice is encoded; the first call warms up
        vol = [SliceInput(image=rng.random((224, 224), dtype=np.float32)) for _ in range(slices)]
        enc0 = a.stats()["encoder_s"]
        t0 = time.perf_counter()
        a.predict_volume(vol)
        seconds = time.perf_counter() - t0
    return {
        "batch": batch,
        "s_per_slice": seconds / slices,
        "encoder_s_per_slice": (a.stats()["encoder_s"] - enc0) / slices,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="16,8,4,1", help="comma-separated encoder/decoder batch sizes")
    p.add_argument("--slices", type=int, default=16, help="slices of the volume")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)  # internal: BANK BATCH, one row
    args = p.parse_args()
    if args._one:
        print(json.dumps(_one(args._one[0], int(args._one[1]), args.slices)))
        return

    from assistant_server.bank_builder import build_bank
    from shared.data.synth import write_msd_dataset

    work = Path(tempfile.mkdtemp(prefix="vessa-encbatch-"))
    write_msd_dataset(work / "synth", cases=6, seed=0)
    build_bank(work / "synth", 2, work / "bank", device="cpu")
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        cmd = [sys.executable, "-m", "benchmarks.cpu_encode_batch", "--slices", str(args.slices), "--_one"]
        out = subprocess.run([*cmd, str(work / "bank"), str(b)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"batch {b} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["s_per_slice"]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads: "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}, {args.slices}-slice volume"
    )
    print("| batch | s/slice (encoder + decoder) | encoder s/slice | peak RSS GB | speed vs first row |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['batch']} | {r['s_per_slice']:.2f} | {r['encoder_s_per_slice']:.2f} | "
            f"{r['peak_rss_gb']:.2f} | {base / r['s_per_slice']:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

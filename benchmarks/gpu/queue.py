"""The GPU queue's items: each one self-contained command that prints one table and writes JSON.

    python -m benchmarks.gpu.queue list
    python -m benchmarks.gpu.queue ITEM [--small] [--out DIR] [--data DIR] [--test DIR]

`benchmarks/gpu/run.sh` is the entry point (it unpacks what travelled first); `docs/gpu.md` is the
checklist and the ledger. Every item checks for a real answer (a bank with exemplars, a label map with
foreground, a finite Dice above a floor, assistant answers that arrived), not only a clean exit, and
exits non-zero when a check fails. `--small`: the same commands on synthetic data, the tiny encoder,
the CPU and a handful of steps (what tests/e2e/test_gpu_queue.py runs).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from benchmarks.gpu.item import ITEMS_FILE, ROOT, Item
from benchmarks.gpu.runs import run_assistant, run_loop, run_perf, run_smoke, run_student


def items() -> list[str]:
    return [
        ln.split("#")[0].strip() for ln in ITEMS_FILE.read_text().splitlines() if ln.split("#")[0].strip()
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("item", help="an item of benchmarks/gpu/items.txt, or 'list'")
    p.add_argument("--small", action="store_true", help="CPU form: synthetic data, tiny encoder, a few steps")
    p.add_argument("--out", type=Path, default=None, help="results folder (default runs/gpu/<item>)")
    p.add_argument(
        "--data", type=Path, default=None, help="dataset (default: .gpu-data/acdc, ../shared/data/acdc)"
    )
    p.add_argument(
        "--test", type=Path, default=None, help="a test split (ACDC volume layout) to evaluate too"
    )
    p.add_argument("--device", default=None, help="default: cuda when there is one (cpu with --small)")
    p.add_argument(
        "--assistant", type=Path, default=None, help="vessa-N: a recipe folder (bank/, assistant.pt) to use"
    )
    args = p.parse_args(argv)
    # SIGTERM (a caller's timeout) unwinds like Ctrl-C, so every step's process group is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    names = items()
    if args.item == "list":
        print("\n".join(names))
        return 0
    if args.item not in names:
        p.error(f"unknown item {args.item!r}; the queue: {', '.join(names)}")
    device = args.device or ("cpu" if args.small else _default_device())
    out = (args.out or ROOT / "runs" / "gpu" / args.item).resolve()
    out.mkdir(parents=True, exist_ok=True)
    it = Item(args.item, out, args.small, args.data, args.test, device, args.assistant)
    kind, _, n = args.item.partition("-")
    t0 = time.perf_counter()
    if kind == "smoke":
        run_smoke(it)
    elif kind == "perf":
        run_perf(it)
    elif kind == "assistant":
        run_assistant(it, int(n))
    elif kind == "loop":
        run_loop(it, int(n))
    else:
        run_student(it, kind, int(n))
    it.figures["item_wall_s"] = round(time.perf_counter() - t0, 1)
    return it.finish()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    raise SystemExit(main())

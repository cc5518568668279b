"""Freed-memory reuse on the CPU, side by side in one run: Stage-1 steps with `keep_freed_memory` on
(the default on the CPU) and off (VESSA_KEEP_FREED_MEMORY=0), each in its own process (glibc's malloc
settings are per process).

    python -m benchmarks.cpu_memory [--steps 6] [--batch-size 4] [--json OUT]

Reports seconds per step, the share of the process's CPU time spent in the kernel and the minor page
faults per step. Results go to docs/benchmarks.md ("Freed-memory reuse on the CPU"). The assistant is
LiteMedSAM with untrained VESSA parts (speed does not depend on weight values), the bank 2 synthetic
patients; run it with OMP_NUM_THREADS=1 on a 2-vCPU machine, like the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")  # "always" makes the faults 512x rarer
_CHILD = """
import json, resource, sys, time
from pathlib import Path
from assistant_server.training.stage1 import Stage1Settings, train_stage1
bank, out, steps, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def run(n, o):
    s = Stage1Settings(bank=bank, out=o, steps=n, batch_size=batch, device="cpu", save_every=10**6, log_every=10**6)
    train_stage1(s)
run(1, out / "warm.pt")  # model set-up and the heap's first growth, not timed
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
run(steps, out / "timed.pt")
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
print(json.dumps({"s_per_step": (t1 - t0) / steps, "sys_share": (r1.ru_stime - r0.ru_stime) /
      max(1e-9, (r1.ru_stime - r0.ru_stime) + (r1.ru_utime - r0.ru_utime)),
      "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6, help="Stage-1 steps timed per row")
    p.add_argument("--batch-size", type=int, default=4, help="episodes per step (the CPU recipe's 4)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    from assistant_server.bank_builder import build_bank
    from shared.data.synth import write_msd_dataset

    work = Path(tempfile.mkdtemp(prefix="vessa-memory-"))
    write_msd_dataset(work / "synth", cases=6, seed=0)
    build_bank(work / "synth", 2, work / "bank", device="cpu")
    rows = {}
    for name, flag in (("keep (default)", "1"), ("off", "0")):
        (work / name).mkdir()
        env = {**os.environ, "VESSA_KEEP_FREED_MEMORY": flag}
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(work / "bank"), str(work / name), str(args.steps), str(args.batch_size)],
            env=env, capture_output=True, text=True, check=True,
        )
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["keep (default)"]["s_per_step"]
    res = {
        "rows": rows,
        "off_over_keep": rows["off"]["s_per_step"] / base,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"THP {_THP.read_text().strip() if _THP.exists() else 'n/a'}",
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
    }
    print(f"{'':16s} {'s/step':>8s} {'kernel share':>13s} {'faults/step':>12s}")
    for k, v in rows.items():
        print(f"{k:16s} {v['s_per_step']:8.2f} {v['sys_share']:13.2f} {v['faults_per_step']:12.0f}")
    print(f"off / keep: {res['off_over_keep']:.2f}x ({res['machine']}, threads {res['threads']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

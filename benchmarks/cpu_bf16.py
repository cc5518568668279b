"""bf16 autocast on the CPU against fp32, side by side in one run: encoder, cold and warm pseudo-labels,
and how far bf16 moves the embeddings and the label maps. (Stage-1 training: time
`VESSA_CPU_BF16=true|false vessa assistant train --steps 12 …`; see docs/benchmarks.md.)

    python -m benchmarks.cpu_bf16 [--ckpt CKPT --bank BANK] [--data DIR] [--threads N] [--json OUT]

Without --ckpt the assistant is LiteMedSAM with untrained VESSA parts (speed does not depend on weight
values); --ckpt/--bank (e.g. the demo's `runs/demo/assistant/assistant.pt`, `runs/demo/bank`) make the
label agreement meaningful. bf16 pays off on CPUs with AVX512-BF16 or AMX (lscpu flags); elsewhere
it can be slower. Results go to docs/benchmarks.md ("bf16 on the CPU").
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn, reps: int) -> float:
    fn()  # first call: lazy initialisation, not timed
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _speed(a, probs: np.ndarray, batch: int, reps: int, rng: np.random.Generator) -> dict[str, float]:
    """Seconds per slice: encoder alone, cold (new slices: encoder + decoder), warm (a known slice with
    a student prompt: decoder only)."""
    from assistant_server.assistant import SliceInput
    from assistant_server.precision import autocast

    x = torch.rand(batch, 3, 256, 256)
    with torch.inference_mode(), autocast(a.device, a.cpu_bf16):
        enc = _timed(lambda: a.model.image_encoder(x), reps) / batch
    cold = _timed(
        lambda: a.predict([SliceInput(image=rng.random((256, 256), dtype=np.float32)) for _ in range(batch)]), reps
    )
    known = [rng.random((256, 256), dtype=np.float32) for _ in range(batch)]
    a.predict([SliceInput(image=s) for s in known])
    warm = _timed(lambda: a.predict([SliceInput(image=s, student_probs=probs) for s in known]), reps)
    return {"encoder_s_per_slice": enc, "cold_s_per_slice": cold / batch, "warm_s_per_slice": warm / batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="pretrained")
    p.add_argument("--bank", type=Path, default=None, help="template bank (default: built from --data)")
    p.add_argument("--data", type=Path, default=None, help="dataset (default: 6 synthetic cases)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=4, help="slices per timed call")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from assistant_server.assistant import Assistant, SliceInput
    from assistant_server.bank_builder import build_bank
    from shared.data import open_dataset
    from shared.data.synth import write_msd_dataset

    work = Path(tempfile.mkdtemp(prefix="vessa-bf16-"))
    data = args.data
    if data is None:
        data = work / "synth"
        write_msd_dataset(data, cases=6, seed=0)
    bank = args.bank
    if bank is None:
        bank = work / "bank"
        build_bank(data, 1, bank, device="cpu")
    ds = open_dataset(data)
    vol = ds.read_volume(ds.volume_ids("val")[0], "val", with_label=False)
    val_slices = [np.asarray(vol.image[k], np.float32) for k in range(vol.image.shape[0])]
    rng = np.random.default_rng(0)
    probs = np.full((len(ds.classes), 128, 128), 1.0 / len(ds.classes), np.float32)

    res: dict = {"rows": {}}
    labels, embs = {}, {}
    for bf16 in (False, True):
        a = Assistant.from_files(args.ckpt, bank, device="cpu", cpu_bf16=bf16, answer_cache_entries=0)
        name = "bf16" if bf16 else "fp32"
        res["rows"][name] = _speed(a, probs, args.batch, args.reps, rng)
        outs = a.predict([SliceInput(image=s) for s in val_slices])
        labels[name] = np.stack([o.label for o in outs])
        embs[name] = torch.stack([a.cache.get(o.slice_hash).embedding.float() for o in outs])

    f, b = res["rows"]["fp32"], res["rows"]["bf16"]
    res["speedup"] = {k: f[k] / b[k] for k in f}
    res["embedding_rel_l2"] = float((embs["fp32"] - embs["bf16"]).norm() / embs["fp32"].norm())
    res["label_agreement"] = float((labels["fp32"] == labels["bf16"]).mean())
    res["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{'':24s} {'fp32':>9s} {'bf16':>9s} {'fp32÷bf16':>10s}")
    for k in f:
        print(f"{k:24s} {f[k]:9.3f} {b[k]:9.3f} {res['speedup'][k]:10.2f}")
    print(f"embedding relative L2 {res['embedding_rel_l2']:.4f}; label agreement {100 * res['label_agreement']:.2f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

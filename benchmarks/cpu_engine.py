"""The CPU engines side by side in one run (issue 30): per configuration (engine, precision, the
decoder's precision, inference options such as refine_below), the encoder alone (slices/s, GFLOP/s), the
assistant's templates-only labels of a dataset's validation volumes as a replica computes them (encoder +
decoder, one volume at a time: slices/s, decoder slices/s and share), mean Dice against ground truth, and
the agreement with the first configuration, the eager PyTorch path (Dice difference, Spearman between the
two paths' case confidences). With --label-job, each configuration instead labels the same volumes
through `vessa label`'s embedded default (local Ray Serve replica, Redis, dispatcher, NIfTI in and out),
timed end to end and scored as `vessa label score` scores.

    python -m benchmarks.cpu_engine --ckpt CKPT --data ../shared/data/acdc [--limit N] [--json OUT]
        [--configs torch:f32,openvino:f32,openvino:bf16,openvino:f32:refine_below=0.3] [--label-job]

A configuration is ENGINE:PRECISION[:dec=PRECISION][:keep=0|1][:OPTION=VALUE…] (OPTION: an InferenceOptions
field; keep: with --label-job, whether the replica keeps freed memory, default 1 as `vessa label` does).
One process, one configuration after the other on the same checkpoint, bank and volumes; converted
models come from the engine cache (the first run converts once). docs/benchmarks.md holds the figures.
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
CONFIGS = "torch:f32,openvino:f32,openvino:bf16,openvino:f32:refine_below=0.3"


def parse_config(text: str) -> dict:
    """'openvino:f32:dec=bf16:refine_below=0.3' → engine, precision, decoder precision, options."""
    engine, precision, *extra = text.split(":")
    out = {"name": text, "engine": engine, "precision": precision, "decoder": None, "options": {}}
    for item in extra:
        key, _, value = item.partition("=")
        if key == "dec":
            out["decoder"] = value
        elif key == "keep":  # --label-job: the replica keeps freed memory (the embedded default's choice)
            out["keep"] = value == "1"
        else:
            out["options"][key] = json.loads(value) if value not in ("", None) else None
    return out


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


def _assistant_rows(args, configs: list[dict], bank: Path, images: list[np.ndarray]) -> list[dict]:
    rows = []
    for c in configs:
        a = Assistant.from_files(args.ckpt, bank, device="cpu", engine=c["engine"], engine_precision=c["precision"],
                                 decoder_precision=c["decoder"], options=c["options"])  # fmt: skip
        enc = encoder_rate(a, images, args.reps)
        served = f"{a.stats()['encoder_engine']}/{a.stats()['decoder_engine']}"
        del a
        s = EvalSettings(ckpt=args.ckpt, data=args.data, bank=bank, split=args.split, limit=args.limit, device="cpu",
                         modes=("templates",), engine=c["engine"], engine_precision=c["precision"],
                         decoder_precision=c["decoder"], **c["options"])  # fmt: skip
        rep = evaluate_assistant(s)
        st = rep["assistant_stats"]
        vols = rep["per_volume"]["templates"]
        rows.append(
            {
                "config": c["name"],
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
        print(f"{c['name']} ({served}): {rows[-1]['label_slices_per_s']:.3f} slices/s, Dice {rows[-1]['mean_dice']:.2f}", flush=True)
    return rows


def _label_job_rows(args, configs: list[dict], bank: Path, work: Path) -> list[dict]:
    """Each configuration through `vessa label`'s embedded default, timed from the service's start
    (replica load, engine compile from the cache) to the last label written, and scored."""
    from services.labeling.embedded import embedded_service
    from services.labeling.runner import run_label_job
    from services.labeling.scoring import score
    from shared.jobs import JobSpec

    ds = open_dataset(args.data)
    ids = ds.volume_ids(args.split)[: args.limit]
    rows = []
    for i, c in enumerate(configs):
        out = work / f"job{i}"
        job = JobSpec(data=str(Path(args.data).resolve()), out=str(out), cases=ids, selection="all")
        t0 = time.perf_counter()
        with embedded_service(args.ckpt, bank.resolve(), out / ".service", "litemedsam", "cpu", 1, None,
                              c["engine"], c["precision"], {**c["options"]}, c.get("keep", True),
                              c["decoder"]) as url:  # fmt: skip
            started = time.perf_counter()
            summary = run_label_job(job, url)
            labeled = time.perf_counter()
        if summary.failed:
            raise RuntimeError(f"{c['name']}: {summary.failed} cases failed")
        result = score(out, Path(args.data))
        cases = sorted(result["cases"], key=lambda r: r["case_id"])
        rows.append(
            {
                "config": c["name"],
                "engine": c["engine"] + "-" + c["precision"],
                "start_s": started - t0,
                "label_s": labeled - started,
                "slices": summary.slices,
                "volumes": len(cases),
                "label_slices_per_s": summary.slices / (labeled - started),
                "mean_dice": result["summary"]["mean"]["dice"] * 100,
                "case_confidence": [r["confidence"] or 0.0 for r in cases],
                "case_dice": [r["mean_dice"] * 100 for r in cases],
            }
        )
        print(f"{c['name']}: vessa label {rows[-1]['label_slices_per_s']:.3f} slices/s (start {rows[-1]['start_s']:.0f} s), Dice {rows[-1]['mean_dice']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--bank", type=Path, default=None, help="the bank (default: the checkpoint's)")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="first N volumes (default: all)")
    p.add_argument("--reps", type=int, default=3, help="encoder batches timed per engine")
    p.add_argument("--configs", default=CONFIGS, help="ENGINE:PRECISION[:dec=P][:OPTION=VALUE],… (the first is the baseline)")
    p.add_argument("--label-job", action="store_true", help="time `vessa label` (embedded default) instead of the assistant in-process")
    p.add_argument("--work", type=Path, default=None, help="--label-job: where the jobs write (default: a temporary directory)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.configs.split(",")]
    bank = _bank_for(EvalSettings(ckpt=args.ckpt, data=args.data, bank=args.bank))
    if args.label_job:
        import tempfile

        rows = _label_job_rows(args, configs, Path(bank), args.work or Path(tempfile.mkdtemp(prefix="vessa-engine-jobs-")))
    else:
        ds = open_dataset(args.data)
        first = ds.read_volume(ds.volume_ids(args.split)[0], args.split)
        images = [np.ascontiguousarray(first.image[z]) for z in range(min(8, first.image.shape[0]))]
        rows = _assistant_rows(args, configs, Path(bank), images)
    base = rows[0]
    for r in rows:
        r["speedup_label"] = r["label_slices_per_s"] / base["label_slices_per_s"]
        if "encoder_slices_per_s" in r:
            r["speedup_encoder"] = r["encoder_slices_per_s"] / base["encoder_slices_per_s"]
        r["dice_minus_eager"] = r["mean_dice"] - base["mean_dice"]
        r["spearman_vs_eager"] = spearman(r["case_confidence"], base["case_confidence"])
    print((job_table if args.label_job else table)(rows, _flags(), args))
    if args.json:
        args.json.write_text(json.dumps({"machine": _flags(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1, default=float))
    return 0


def table(rows: list[dict], machine: str, args) -> str:
    out = [f"CPU engines — {machine}; {rows[0]['volumes']} {args.split} volumes, {rows[0]['slices']} slices",
           "config                                   served               enc sl/s enc GFLOP/s enc ×  label sl/s label ×  dec sl/s dec share  Dice   ΔDice  Spearman"]  # fmt: skip
    for r in rows:
        out.append(
            f"{r['config']:<40} {r['engine']:<20} {r['encoder_slices_per_s']:8.2f} {r['encoder_gflops']:11.1f} {r['speedup_encoder']:5.2f}"
            f" {r['label_slices_per_s']:10.3f} {r['speedup_label']:7.2f} {r['decoder_slices_per_s']:9.2f} {r['decoder_share']:9.0%}"
            f" {r['mean_dice']:6.2f} {r['dice_minus_eager']:+6.2f} {r['spearman_vs_eager']:9.3f}"
        )
    return "\n".join(out)


def job_table(rows: list[dict], machine: str, args) -> str:
    out = [f"vessa label (embedded default) — {machine}; {rows[0]['volumes']} {args.split} volumes, {rows[0]['slices']} slices",
           "config                                   start s  label s  label sl/s  label ×   Dice   ΔDice  Spearman"]  # fmt: skip
    for r in rows:
        out.append(
            f"{r['config']:<40} {r['start_s']:7.0f} {r['label_s']:8.0f} {r['label_slices_per_s']:11.3f} {r['speedup_label']:8.2f}"
            f" {r['mean_dice']:6.2f} {r['dice_minus_eager']:+6.2f} {r['spearman_vs_eager']:9.3f}"
        )
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())

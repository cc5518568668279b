"""The GPU queue's items, one function each (docs/gpu.md): every one runs real commands and checks for a
real answer, not only a clean exit."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.gpu.item import (
    DICE_FLOOR,
    LOOP_BUDGET_S,
    PY,
    ROOT,
    STAGE1_FALLBACK_STEPS,
    TRAIN_BUDGET_S,
    VESSA,
    Item,
    _bank_size,
    _env,
    _json,
    _last_quarter_range,
    _redis_check,
    _rest_check,
    _same_shape,
    _stop,
    _student_dice,
    _val_curve_from_tb,
    _wait_serving,
)
from services.runtime.net import free_port


def run_smoke(it: Item) -> None:
    """Every path once on the device: bank, Stage-1 steps, the Serve app (REST on a NIfTI volume) with
    the Redis path, BCP + VESSA trainer steps (graph-ready step, assistant over Redis), eval, predict."""
    data_raw = it.out / "synth"
    it.sh("data_synth", [*VESSA, "data", "synth", str(data_raw), "--cases", "8", "--seed", "0"])
    enc = ["--encoder", "tiny"] if it.small else ["--encoder", "litemedsam"]
    dev = ["--device", it.device]
    bank, ckpt = it.out / "bank", it.out / "assistant.pt"
    it.sh(
        "bank_build",
        [*VESSA, "bank", "build", "--data", str(data_raw), "--labeled", "3", "--out", str(bank), *enc, *dev],
    )
    it.check("bank build: exemplars", _bank_size(bank) > 0, _bank_size(bank))
    it.sh(
        "stage1",
        [
            *VESSA,
            "assistant",
            "train",
            "--bank",
            str(bank),
            "--out",
            str(ckpt),
            "--steps",
            "1" if it.small else "3",
            "--batch-size",
            "1" if it.small else "2",
            *enc,
            *dev,
        ],
    )
    it.check("Stage-1: checkpoint", ckpt.is_file(), str(ckpt))

    port = free_port()
    log = it.out / "logs" / "serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cfg = ["--config", "deploy/serve_gpu.yaml"] if not it.small else ["--num-cpus", "2"]
    serve_cmd = [*VESSA, "serve", "--ckpt", str(ckpt), "--bank", str(bank), *enc, *dev, "--stream", "--port", str(port),
                 "--replicas", "1", "--run-dir", str(it.out / "serve_run"), *cfg]  # fmt: skip
    t0 = time.perf_counter()
    fh = log.open("w")
    serve = subprocess.Popen(
        serve_cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
    )
    try:
        url, redis_url = _wait_serving(log, serve, timeout=300)
        it.figures["serve_start_s"] = round(time.perf_counter() - t0, 1)
        it.check(
            "Serve app up (REST and Redis path)", bool(url and redis_url), {"url": url, "redis": redis_url}
        )
        if url:
            _rest_check(it, url, data_raw)
        if redis_url:
            _redis_check(it, redis_url, data_raw)
            run_dir = it.out / "train"
            sizes = ["64", "8", "4"] if it.small else ["256", "24", "12"]
            cmd = [*VESSA, "train", "--method", "bcp_vessa", "--data", str(data_raw), "--out-dir", str(run_dir),
                   "--max-iters", "6", "--device", it.device,
                   "--set", "bcp.pretrain_iters=5", "--set", "val_every=6", "--set", "progress=false",
                   "--set", f"data.image_size={sizes[0]}", "--set", f"batch_size={sizes[1]}", "--set", f"labeled_bs={sizes[2]}",
                   "--set", "step.mode=graph", "--set", "vessa.warmup_iters=3", "--set", "step.assistant_refresh_every=3",
                   "--set", "vessa.link=student_trainer.stream_link:StreamAssistantLink",
                   "--set", f"vessa.link_kwargs.redis_url={redis_url}", "--set", "vessa.link_kwargs.trainer_id=smoke",
                   "--set", "step.assistant_timeout_s=240",
                   *(["--set", "step.assistant_table_slices=8"] if it.small else [])]  # fmt: skip
            it.sh("train_bcp_vessa_graph", cmd, timeout=600)
            res = _json(run_dir / "result.json")
            table_answered = (res.get("graph_step") or {}).get("table_answered", 0)
            it.check("BCP + VESSA trainer: steps ran", res.get("step") == 11, res.get("step"))
            it.check("BCP + VESSA trainer: assistant answers over Redis", table_answered > 0, table_answered)
            it.figures["trainer_graph_step"] = res.get("graph_step")
            best = run_dir / "best.pt"
            it.sh("eval", [*VESSA, "eval", "--ckpt", str(best), "--data", str(data_raw), "--split", "val",
                           "--out", str(it.out / "eval"), "--device", it.device])  # fmt: skip
            dice = _student_dice(it.out / "eval" / "metrics.json")
            it.check("vessa eval: finite Dice", dice is not None and math.isfinite(dice), dice)
            vol = sorted((data_raw / "imagesTr").glob("*.nii.gz"))[0]
            pred = it.out / "predict.nii.gz"
            it.sh(
                "predict",
                [*VESSA, "predict", str(vol), "--ckpt", str(best), "-o", str(pred), "--device", it.device],
            )
            it.check("vessa predict: uint8 label map of the input's shape", _same_shape(vol, pred), str(pred))
    finally:
        _stop(serve)
        fh.close()


def run_perf(it: Item) -> None:
    """device_run.sh's table (cold target 5,000 slices/s model-alone), then the graph-ready trainer."""
    env = _env(OUT=str(it.out / "device_run"))
    it.sh("device_run", ["bash", "benchmarks/device_run.sh", *(["--small"] if it.small else [])], env=env)
    summary = _json(it.out / "device_run" / "summary.json")
    figures = summary.get("figures", {})
    it.figures["device_run"] = figures
    it.figures["encoder_levers"] = _json(it.out / "device_run" / "model.json").get("levers")
    it.check(
        "device_run: every figure measured",
        bool(figures) and all(isinstance(v, int | float) and v == v and v > 0 for v in figures.values()),
        figures,
    )
    train = (["--iters", "1", "--warmup", "1", "--image-size", "64", "--batch-size", "8", "--cases", "6", "--device", "cpu",
              "--lcc-backend", "torch"] if it.small else
             ["--iters", "200", "--warmup", "20", "--image-size", "256", "--batch-size", "24"])  # fmt: skip
    out = it.out / "trainer_graph.json"
    it.sh("trainer_graph_step", [PY, "-m", "student_trainer.benchmark", "--methods", "supervised,bcp_pretrain,bcp,bcp_vessa",
                                 "--step", "graph", *train, "--json", str(out)])  # fmt: skip
    rep = _json(out)
    rates = {m["method"]: m["it_per_s"] for m in rep.get("methods", [])}
    syncs = {m["method"]: m["syncs_per_it"] for m in rep.get("methods", [])}
    it.figures["graph_step_it_per_s"] = rates
    it.figures["graph_step_syncs_per_it"] = syncs
    it.check(
        "graph-ready step: every method timed", len(rates) == 4 and all(r > 0 for r in rates.values()), rates
    )
    it.check("graph-ready step: no host sync", all(s == 0 for s in syncs.values()), syncs)
    if not it.small and rates.get("bcp"):
        it.figures["graph_bcp_vs_target_100"] = rates["bcp"] / 100.0
        it.figures["graph_vessa_over_bcp"] = rates.get("bcp_vessa", 0.0) / rates["bcp"]


def run_assistant(it: Item, n: int) -> None:
    data = it.dataset()
    ckpt, bank = it.assistant(n, data, it.out)
    for split, root in [("val", data)] + ([("test", it.test)] if it.test else []):
        ev = it.out / f"eval_{split}"
        it.sh(f"assistant_eval_{split}", [*VESSA, "assistant", "eval", "--ckpt", str(ckpt), "--data", str(root),
                                           "--split", split, "--out", str(ev), *(["--device", "cpu", "--limit", "1", "--modes", "templates"] if it.small else [])])  # fmt: skip
        rep = _json(ev / "metrics.json")
        dice = {
            m: 100 * s["mean"]["dice"]
            for m, s in rep.get("summary", {}).items()
            if "dice" in s.get("mean", {})
        }
        it.figures[f"{split}_mean_dice"] = dice
        it.check(f"assistant eval ({split}): volumes scored", rep.get("volumes", 0) > 0, rep.get("volumes"))
        best = dice.get("templates", float("nan"))
        floor = 0.0 if it.small else DICE_FLOOR[("assistant", n)]
        it.check(
            f"assistant eval ({split}): templates-only Dice ≥ {floor:g}",
            best == best and best >= floor,
            round(best, 2),
        )


def run_student(it: Item, method: str, n: int) -> None:
    data = it.dataset()
    key = {"supervised": "supervised", "bcp": "bcp", "vessa": "bcp_vessa"}[method]
    cfg = ROOT / "configs" / "train" / f"acdc_{key}_{n}_gpu.yaml"
    run_dir = it.out / "train"
    sets: list[str] = []
    if method == "vessa":
        # the assistant item's output (same warm machine, or --assistant), else a recipe of its own
        a_dir = it.assistant_dir or ROOT / "runs" / "gpu" / f"assistant-{n}"
        if not (a_dir / "assistant.pt").is_file():
            a_dir = it.out / "assistant"
            it.assistant(n, data, a_dir, steps=STAGE1_FALLBACK_STEPS)
        bank = a_dir / "bank"
        sets += ["vessa.link=student_trainer.inprocess_link:InProcessAssistantLink",
                 f"vessa.link_kwargs.ckpt={a_dir / 'assistant.pt'}", f"vessa.link_kwargs.bank={bank}",
                 f"vessa.link_kwargs.device={it.device}",
                 f"vessa.link_kwargs.encoder={'tiny' if it.small else 'litemedsam'}"]  # fmt: skip
        it.figures["assistant"] = str(a_dir)
    extra = ["--data", str(data), "--out-dir", str(run_dir)]
    if it.small:
        extra += ["--device", "cpu", "--max-iters", "6"]
        sets += ["bcp.pretrain_iters=4", "val_every=3", "data.image_size=32", "batch_size=8", "labeled_bs=4",
                 "step.graph_warmup=1", "vessa.warmup_iters=2", "step.assistant_refresh_every=2",
                 "step.assistant_table_slices=4"]  # fmt: skip
    for s in sets + ["progress=false"]:
        extra += ["--set", s]
    rc = it.sh(
        "train", [*VESSA, "train", "--config", str(cfg), *extra], timeout=None if it.small else TRAIN_BUDGET_S
    )
    res = _json(run_dir / "result.json")
    it.figures["completed_schedule"] = rc == 0
    it.figures["iterations_per_s"] = res.get("iterations_per_s")
    it.figures["graph_step"] = res.get("graph_step")
    curve = res.get("val_dice") or _val_curve_from_tb(run_dir)
    it.figures["val_dice_last_quarter_range"] = _last_quarter_range(curve)
    it.check("training wrote its best checkpoint", (run_dir / "best.pt").is_file(), str(run_dir / "best.pt"))
    if method == "vessa":
        answered = (res.get("graph_step") or {}).get("table_answered", 0)
        it.check("assistant answers reached the student", answered > 0, answered)
    for split, root in [("val", data)] + ([("test", it.test)] if it.test else []):
        ev = it.out / f"eval_{split}"
        it.sh(f"eval_{split}", [*VESSA, "eval", "--ckpt", str(run_dir / "best.pt"), "--data", str(root), "--split", split,
                                "--out", str(ev), "--device", it.device])  # fmt: skip
        dice = _student_dice(ev / "metrics.json")
        it.figures[f"{split}_mean_dice"] = dice
        n_vol = _json(ev / "metrics.json").get("summary", {}).get("n_volumes", 0)
        it.check(f"student eval ({split}): every volume scored", n_vol > 0, n_vol)
        floor = 0.0 if it.small else DICE_FLOOR[(method, n)]
        it.check(f"student eval ({split}): mean Dice ≥ {floor:g}", dice is not None and dice >= floor, dice)


def run_loop(it: Item, n: int) -> None:
    """VESSA's closed loop at its GPU schedule (docs/jobs.md, "The loop"): `vessa label --rounds 3
    --loop-config configs/loop/gpu.yaml` with the embedded default (Serve replica, Redis, dispatcher) and
    the student on the device, every case of a dataset with ground truth; the per-round table."""
    t0 = time.perf_counter()
    rounds = 2 if it.small else 3
    source = it.dataset()
    data = _loop_dataset(it, source, n)
    from services.labeling.cases import discover

    n_cases = len(discover(data).cases)
    it.figures["data"] = str(data)
    it.figures["cases"] = n_cases
    # the assistant item's output (same warm machine, or --assistant), else a recipe of its own
    a_dir = it.assistant_dir or ROOT / "runs" / "gpu" / f"assistant-{n}"
    if not (a_dir / "assistant.pt").is_file():
        a_dir = it.out / "assistant"
        it.assistant(n, source, a_dir, steps=STAGE1_FALLBACK_STEPS)
    it.figures["assistant"] = str(a_dir)
    job = it.out / "job"
    if it.small:
        cfg = it.out / "loop_small.yaml"
        cfg.write_text(
            f"loop:\n  labeled: {n}\n  steps: 4\n  batch_size: 4\n  image_size: 32\n  device: {it.device}\n"
        )
        enc = ["--encoder", "tiny", "--student-steps", "4"]
    else:
        cfg = ROOT / "configs" / "loop" / "gpu.yaml"
        enc = ["--encoder", "litemedsam"]
    cmd = [*VESSA, "label", "--data", str(data), "--out", str(job), "--all", "--ckpt", str(a_dir / "assistant.pt"),
           "--bank", str(a_dir / "bank"), "--device", it.device, *enc, "--rounds", str(rounds), "--loop-config", str(cfg),
           "--labeled", str(n), "--student-device", it.device, "--no-progress"]  # fmt: skip
    # the item's budget, less what it spent on data and an assistant of its own
    budget = max(60.0, LOOP_BUDGET_S - (time.perf_counter() - t0))
    # a rerun resumes the finished rounds (their round.json); the table is this run's
    (job / "rounds.json").unlink(missing_ok=True)
    rc = it.sh("label_loop", cmd, timeout=None if it.small else budget)
    try:
        rows = json.loads((job / "rounds.json").read_text())
    except (OSError, ValueError):  # stopped at the budget: the rounds that were finished
        rows = [r for r in (_json(job / "rounds" / str(k) / "round.json") for k in range(rounds + 1)) if r]
    it.figures["completed_schedule"] = rc != 124 and (job / "rounds.json").is_file()
    it.figures["rounds"] = [
        {"round": row.get("round"), "cases": row.get("cases"), "failed": row.get("failed"),
         "confidence_mean": row.get("confidence_mean"), "dice": row.get("dice"),
         "student_steps": (row.get("train") or {}).get("steps"), "student_s": (row.get("train") or {}).get("seconds"),
         "student_it_per_s": (row.get("train") or {}).get("iterations_per_s"),
         "pseudo_slices": (row.get("train") or {}).get("pseudo_slices"), "label_s": row.get("label_seconds")}
        for row in rows
    ]  # fmt: skip
    if rows:
        it.figures["last_round_dice_per_class"] = rows[-1].get("dice_per_class")
    manifest = _json(job / "labels.json").get("job", {})
    it.figures["loop_s"] = manifest.get("loop_seconds")
    it.figures["rounds_redone"] = manifest.get("rounds_redone")

    got = [row.get("round") for row in rows]
    it.check(
        f"loop: rounds 0..{rounds} in rounds.json",
        it.figures["completed_schedule"] and got == list(range(rounds + 1)),
        got,
    )
    done = [(row.get("cases"), row.get("failed")) for row in rows]
    it.check(
        f"loop: all {n_cases} cases labeled in every round, none failed",
        len(rows) == rounds + 1 and all(c == n_cases and f == 0 for c, f in done),
        done,
    )
    dice = [row.get("dice") for row in rows]
    scored = [row.get("scored_cases") for row in rows]
    it.check(
        "loop: a finite Dice for every round, every case scored",
        len(rows) == rounds + 1
        and all(isinstance(d, int | float) and math.isfinite(d) for d in dice)
        and all(s == n_cases for s in scored),
        {"dice": dice, "scored": scored},
    )
    students = [(job / "rounds" / str(r) / "student.pt").is_file() for r in range(1, rounds + 1)]
    it.check("loop: a student checkpoint for every round >= 1", all(students), students)
    floor = 0.0 if it.small else DICE_FLOOR[("loop", n)]
    last = dice[-1] if len(rows) == rounds + 1 else None
    it.check(f"loop: round {rounds}'s mean Dice >= {floor:g}", last is not None and last >= floor, last)


# -- helpers ---------------------------------------------------------------------------------------------
def _loop_dataset(it: Item, data: Path, n: int) -> Path:
    """The loop's dataset: its cases must be volumes (services/labeling/cases.py: `discover`) and its
    first n patients' slices what the student trains on. A prepared cache (the carried .gpu-data/acdc,
    the small form's) is neither to `discover`: its validation volumes (at their own size) and the
    training slices of its first n + 1 patients (at the cache's size; the protocol split needs one
    patient beyond the labeled ones, whose slices the loop never reads) are written out here in the
    SSL4MIS layout, with the cache's values. Any other dataset is used as it is."""
    if not (data / "vessa_cache.json").is_file():
        return data
    out = it.out / "loop_data"
    if (out / "train_slices.list").is_file():
        return out  # written by an earlier run of the item
    t0 = time.perf_counter()
    import h5py

    from shared.data import open_dataset

    ds = open_dataset(data)
    part = it.out / "loop_data.partial"
    shutil.rmtree(part, ignore_errors=True)
    (part / "volumes").mkdir(parents=True)
    (part / "slices").mkdir()
    cases = ds.volume_ids("val")
    for case in cases:
        vol = ds.read_volume(case, "val")
        with h5py.File(part / "volumes" / f"{case}.h5", "w") as f:
            f.create_dataset("image", data=vol.image.astype("float32"))
            f.create_dataset("label", data=vol.label.astype("uint8"))
    keep = set(ds.patients()[: n + 1])
    keys = []
    for ref in ds.slice_refs():
        if ref.patient_id in keep:
            item = ds.read_labeled(ref)
            with h5py.File(part / "slices" / f"{ref.key}.h5", "w") as f:
                f.create_dataset("image", data=item.image.astype("float32"))
                f.create_dataset("label", data=item.label.astype("uint8"))
            keys.append(ref.key)
    (part / "val.list").write_text("".join(f"{c}\n" for c in cases))
    (part / "train_slices.list").write_text("".join(f"{k}\n" for k in keys))  # last: the layout's marker
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)
    it.figures["loop_data_written_s"] = round(time.perf_counter() - t0, 1)
    it.check(
        "loop data: the cache's volumes written out",
        len(cases) > 0 and len(keys) > 0,
        {"volumes": len(cases), "slices": len(keys)},
    )
    return out

"""The GPU queue's items, one function each (docs/gpu.md): every one runs real commands and checks for a
real answer, not only a clean exit."""

from __future__ import annotations

import math
import subprocess
import time

from benchmarks.gpu.item import (
    DICE_FLOOR,
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


# -- helpers ---------------------------------------------------------------------------------------------

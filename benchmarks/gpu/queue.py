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
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.runtime.net import free_port

ROOT = Path(__file__).resolve().parents[2]
ITEMS_FILE = Path(__file__).with_name("items.txt")
PY = sys.executable
VESSA = [PY, "-m", "services.cli.main"]

# Mean foreground Dice (%) on the validation volumes below which a full-schedule item has failed: far
# under the published anchors (architecture page), so only a broken run trips them.
DICE_FLOOR = {
    ("assistant", 3): 50.0,
    ("assistant", 7): 60.0,
    ("supervised", 3): 20.0,
    ("supervised", 7): 55.0,
    ("bcp", 3): 60.0,
    ("bcp", 7): 70.0,
    ("vessa", 3): 60.0,
    ("vessa", 7): 70.0,
}
# wall-clock budget of the training command of an item (the run tool allows 10 minutes a command; the
# queue's items must end inside 9): past it the run is stopped and its best checkpoint evaluated,
# recorded as an incomplete schedule
TRAIN_BUDGET_S = float(os.environ.get("VESSA_GPU_TRAIN_BUDGET_S", "420"))
# Stage-1 steps when a VESSA item finds no assistant from its assistant item (same warm machine)
STAGE1_FALLBACK_STEPS = int(os.environ.get("VESSA_GPU_STAGE1_STEPS", "2000"))


def items() -> list[str]:
    return [
        ln.split("#")[0].strip() for ln in ITEMS_FILE.read_text().splitlines() if ln.split("#")[0].strip()
    ]


@dataclass
class Item:
    name: str
    out: Path
    small: bool
    data: Path | None
    test: Path | None
    device: str
    assistant_dir: Path | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)

    # -- running commands ---------------------------------------------------------------------------
    def sh(self, name: str, cmd: list[str], timeout: float | None = None, env: dict | None = None) -> int:
        """Run `cmd`, output to out/logs/<name>.log; recorded with its wall time. On timeout the process
        group gets SIGINT, then SIGKILL; returns the exit status (124 for a timeout)."""
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with log.open("w") as fh:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env or _env(), start_new_session=True
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop(proc)
                rc = 124
            except BaseException:  # interrupted or terminated: leave nothing running behind
                _stop(proc)
                raise
        self.steps.append(
            {"step": name, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "log": str(log)}
        )
        print(f"[{self.name}] {name}: rc {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        return rc

    def check(self, name: str, ok: bool, detail: Any = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    # -- shared steps -------------------------------------------------------------------------------
    def dataset(self) -> Path:
        """The data an item trains on: --data, else the carried cache, else the shared ACDC copy; with
        --small and no --data, a synthetic set written here, then cached by `vessa data prepare`."""
        if self.data is not None:
            return self.data
        if not self.small:
            for cand in (ROOT / ".gpu-data" / "acdc", ROOT.parent / "shared" / "data" / "acdc"):
                if cand.exists():
                    return cand
            raise SystemExit("no data: pass --data, or carry .gpu-data/acdc (benchmarks/gpu/pack.sh data)")
        raw, cache = self.out / "synth", self.out / "synth_cache"
        if not (cache / "vessa_cache.json").is_file():
            # 14 cases: 3-4 validation volumes, and unlabeled patients left over at N = 7
            self.sh("data_synth", [*VESSA, "data", "synth", str(raw), "--cases", "14", "--seed", "0"])
            self.sh(
                "data_prepare",
                [*VESSA, "data", "prepare", str(raw), str(cache), "--size", "64", "--workers", "1"],
            )
        self.check("data cache written", (cache / "vessa_cache.json").is_file(), str(cache))
        return cache

    def assistant(self, n: int, data: Path, out: Path, steps: int | None = None) -> tuple[Path, Path]:
        """Bank + Stage-1: the one-command recipe when it and its GPU config exist, else the two commands
        it stands for. Returns (checkpoint, bank)."""
        cfg = ROOT / "configs" / "assistant" / f"acdc_{n}_gpu.yaml"
        ckpt, bank = out / "assistant.pt", out / "bank"
        small = (
            ["--encoder", "tiny", "--device", "cpu", "--steps", "1", "--batch-size", "1"]
            if self.small
            else []
        )
        if not self.small and steps is not None:
            small = ["--steps", str(steps)]
        if cfg.is_file() and _has_command("assistant", "recipe"):
            cmd = [
                *VESSA,
                "assistant",
                "recipe",
                "--config",
                str(cfg),
                "--data",
                str(data),
                "--out",
                str(out),
            ]
            self.sh("assistant_recipe", cmd + ["--labeled", str(n)] + small)
        else:
            enc = ["--encoder", "tiny", "--device", "cpu"] if self.small else ["--device", self.device]
            self.sh(
                "bank_build",
                [*VESSA, "bank", "build", "--data", str(data), "--labeled", str(n), "--out", str(bank), *enc],
            )
            train = (
                ["--steps", "1", "--batch-size", "1"]
                if self.small
                else (["--steps", str(steps)] if steps else [])
            )
            self.sh(
                "assistant_train",
                [*VESSA, "assistant", "train", "--bank", str(bank), "--out", str(ckpt), *enc, *train],
            )
        self.check("template bank has exemplars", _bank_size(bank) > 0, _bank_size(bank))
        self.check("assistant checkpoint written", ckpt.is_file() and ckpt.stat().st_size > 0, str(ckpt))
        return ckpt, bank

    def finish(self) -> int:
        ok = all(c["ok"] for c in self.checks) and bool(self.checks)
        result = {
            "item": self.name,
            "small": self.small,
            "device": self.device,
            "gpu": _gpu_name(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "commit": _commit(),
            "ok": ok,
            "figures": self.figures,
            "checks": self.checks,
            "steps": self.steps,
        }
        (self.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        print(table(result))
        return 0 if ok else 1


# -- items ----------------------------------------------------------------------------------------------
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
def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGINT to the process group (vessa serve and train stop cleanly on it), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _has_command(*path: str) -> bool:
    r = subprocess.run([*VESSA, *path, "--help"], cwd=ROOT, capture_output=True, text=True, env=_env())
    return r.returncode == 0


def _bank_size(bank: Path) -> int:
    try:
        from assistant_server.bank import TemplateBank

        return len(TemplateBank(bank))
    except Exception:
        return 0


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _student_dice(metrics: Path) -> float | None:
    rep = _json(metrics)
    try:
        return round(100 * float(rep["summary"]["mean"]["dice"]), 2)
    except (KeyError, TypeError, ValueError):
        return None


def _last_quarter_range(curve: list) -> float | None:
    """Range (max - min, Dice %) of the self-training phase's validation Dice over its last quarter:
    the convergence evidence a shortened schedule must show."""
    vals = [100 * float(v) for _, phase, v in curve if phase == "train"] if curve else []
    if len(vals) < 4:
        return None
    tail = vals[len(vals) * 3 // 4 :]
    return round(max(tail) - min(tail), 2)


def _val_curve_from_tb(run_dir: Path) -> list:
    return []  # a run stopped at its budget writes no result.json; its curve stays in run_dir/tb


def _same_shape(src: Path, pred: Path) -> bool:
    try:
        import nibabel as nib

        a, b = nib.load(str(src)), nib.load(str(pred))
        data = np.asarray(b.dataobj)
        # a student of a few steps may predict background only: the check is the map, not its quality
        return a.shape == b.shape and data.dtype == np.uint8 and int(data.max()) <= 3
    except Exception:
        return False


def _wait_serving(log: Path, proc: subprocess.Popen, timeout: float) -> tuple[str | None, str | None]:
    import re

    deadline = time.monotonic() + timeout
    url = redis = None
    while time.monotonic() < deadline and proc.poll() is None:
        text = log.read_text(errors="replace")
        m = re.search(r"VESSA is serving at (\S+)", text)
        r = re.search(r"Redis path: (\S+)", text)
        url, redis = (m.group(1) if m else None), (r.group(1) if r else None)
        if url and redis:
            return url, redis
        time.sleep(2)
    return url, redis


def _rest_check(it: Item, url: str, data: Path) -> None:
    from services.ingress.client import AssistantClient

    vol = sorted((data / "imagesTr").glob("*.nii.gz"))[0]
    client = AssistantClient(url, timeout=600)
    try:
        t0 = time.perf_counter()
        reply = client.pseudo_labels(str(vol))
        it.figures["rest_volume_s"] = round(time.perf_counter() - t0, 2)
        import nibabel as nib

        shape = nib.load(str(vol)).shape
        labels = reply.labels
        it.check(
            "REST pseudo-labels: a label map of the volume's shape",
            tuple(labels.shape) == tuple(shape),
            list(labels.shape),
        )
        it.check("REST pseudo-labels: foreground found", int(labels.max()) > 0, int(labels.max()))
    except Exception as exc:  # recorded as a failed check, the other paths still run
        it.check("REST pseudo-labels", False, repr(exc)[:300])
    finally:
        client.close()


def _redis_check(it: Item, redis_url: str, data: Path) -> None:
    from shared.data import open_dataset
    from shared.data.split import split_by_patient
    from student_trainer.assistant_link import PseudoLabelRequest
    from student_trainer.stream_link import StreamAssistantLink

    split = split_by_patient(open_dataset(data), 3)
    from shared.data.resize import resize_image

    imgs = np.stack([resize_image(split.unlabeled[i].image, (256, 256)) for i in range(4)]).astype(np.float32)
    link = StreamAssistantLink(redis_url, "smoke-check")
    try:
        t0 = time.perf_counter()
        rid = link.submit(PseudoLabelRequest(keys=[f"k{i}" for i in range(4)], images=imgs))
        res = link.result(rid, 300)
        it.figures["redis_batch_s"] = round(time.perf_counter() - t0, 2)
        ok = res is not None and res.labels.shape == (4, 256, 256) and bool(np.isfinite(res.confidence).all())
        it.check("Redis path: 4-slice request answered", ok, None if res is None else list(res.labels.shape))
    except Exception as exc:
        it.check("Redis path", False, repr(exc)[:300])
    finally:
        link.close()


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def _commit() -> str:
    """VESSA_COMMIT (the device machine gets no .git, docs/gpu.md), else git's HEAD."""
    if os.environ.get("VESSA_COMMIT"):
        return os.environ["VESSA_COMMIT"]
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return r.stdout.strip() or "unknown"


def table(result: dict[str, Any]) -> str:
    lines = [f"GPU queue item {result['item']}{' (--small)' if result['small'] else ''} — {result['gpu'] or result['device']}, "
             f"{result['date_utc']} UTC, commit {result['commit']}: {'PASSED' if result['ok'] else 'FAILED'}"]  # fmt: skip
    lines.append(f"{'check':62s} {'ok':>4s}  detail")
    for c in result["checks"]:
        detail = json.dumps(c["detail"], default=str)
        lines.append(f"{c['check'][:62]:62s} {'yes' if c['ok'] else 'NO':>4s}  {detail[:90]}")
    for k, v in result["figures"].items():
        lines.append(f"  {k}: {json.dumps(v, default=str)[:150]}")
    return "\n".join(lines)


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
    else:
        run_student(it, kind, int(n))
    it.figures["item_wall_s"] = round(time.perf_counter() - t0, 1)
    return it.finish()


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    raise SystemExit(main())

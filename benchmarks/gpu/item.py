"""One GPU queue item while it runs: its commands (logged, timed, stopped at a budget), its checks and
figures, and the result it writes; plus the small readers the items share."""


from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    ("loop", 3): 50.0,  # the last round's labels of the closed loop (vessa label --rounds 3)
    ("loop", 7): 60.0,
}
# wall-clock budget of the training command of an item (the run tool allows 10 minutes a command; the
# queue's items must end inside 9): past it the run is stopped and its best checkpoint evaluated,
# recorded as an incomplete schedule
TRAIN_BUDGET_S = float(os.environ.get("VESSA_GPU_TRAIN_BUDGET_S", "420"))
# wall-clock budget of a loop item's `vessa label --rounds K` (service start, K + 1 labeling passes, K
# students), less what the item spent before it (data, an assistant of its own): the same stop, recorded
# as an incomplete schedule; a rerun on the same machine resumes at the first unfinished round
LOOP_BUDGET_S = float(os.environ.get("VESSA_GPU_LOOP_BUDGET_S", "450"))
# Stage-1 steps when a VESSA item finds no assistant from its assistant item (same warm machine)
STAGE1_FALLBACK_STEPS = int(os.environ.get("VESSA_GPU_STAGE1_STEPS", "2000"))


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
        if isinstance(v, list) and v and all(isinstance(row, dict) for row in v):
            lines.append(f"  {k}:")
            lines += _rows(v)
        else:
            lines.append(f"  {k}: {json.dumps(v, default=str)[:150]}")
    return "\n".join(lines)


def _rows(rows: list[dict[str, Any]]) -> list[str]:
    """A figure that is a list of rows (the loop's per-round table) as aligned columns."""
    cols = list(dict.fromkeys(c for row in rows for c in row))
    cells = [
        ["-" if row.get(c) is None else json.dumps(row[c], default=str)[:40] for c in cols] for row in rows
    ]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    return ["    " + "  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in [cols, *cells]]

"""MONAI Label's "train" for VESSA: the corrected cases into the template bank, then a short Stage-1 fine-tune.

`POST /train/{model}` starts a `FineTuner` Ray actor (never the ingress process) that
  1. adds every `final` label not in the bank yet (its newest version) to the bank, each encoded by an
     assistant replica (`add_templates`, through a Serve handle): the next inference already uses them;
  2. fine-tunes Stage-1 (assistant_server/training/stage1.py) from the served checkpoint on the grown bank
     for `max_steps` steps (POST body params), writing into `<store>/train/<run id>/`;
  3. publishes the result atomically as `<store>/checkpoints/vessa-<run id>.pt` (a new file, beside its
     `.config.resolved.yaml`; the served checkpoint is never overwritten).
The ingress then has the replicas serve it (`use_model`: every replica, through a file beside the bank)
and GET /info/ shows the new model version. Status is MONAI Label's task record (`GET /train/`: id, type,
status, start_ts, end_ts, params, result, details) plus step, max_steps, loss, phase and error. One run at
a time (429). `DELETE /train/` kills the actor: status STOPPED, its work directory and any checkpoint it
published are removed, the old model stays served. Slicer polls `GET /train/?check_if_running=true` on
every refresh: 404 unless a run is going on.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from services.ingress.monailabel.datastore import Datastore, FinalLabel
from services.ingress.monailabel.volumes import read_image
from shared.data.nifti import load_label_nifti
from shared.wire.protocol import Limits

TRAINER = "vessa"
DESCRIPTION = (
    "adds every final label not yet in the template bank to it (encoded by the assistant replicas), then "
    "fine-tunes Stage-1 from the served checkpoint for max_steps steps and serves the new checkpoint"
)
DEFAULT_STEPS = 30  # a short fine-tune: minutes on a CPU for LiteMedSAM, seconds for the tiny test model
MAX_STEPS = 20000
PARAMS = {"max_steps": DEFAULT_STEPS, "batch_size": 4, "lr": None}


@dataclass
class TrainRun:
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: str = "RUNNING"  # RUNNING, DONE, STOPPED, ERROR (MONAI Label's words)
    start_ts: float = field(default_factory=time.time)
    end_ts: float | None = None
    result: dict = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    phase: str = "bank"  # bank, train, publish, serve
    step: int = 0
    loss: float | None = None
    error: str | None = None
    stop: bool = False
    task: asyncio.Task | None = None
    actor: object = None  # the FineTuner's actor handle while it lives
    paths: dict = field(default_factory=dict)  # work dir and checkpoint of this run (removed when stopped)

    def as_json(self) -> dict:
        return {
            "id": self.id,
            "type": "train",
            "status": self.status,
            "start_ts": int(self.start_ts),
            "end_ts": int(self.end_ts) if self.end_ts else None,
            "params": self.params,
            "result": self.result,
            "details": self.details,
            "phase": self.phase,
            "step": self.step,
            "max_steps": self.params.get("max_steps"),
            "loss": self.loss,
            "error": self.error,
        }

    def update(self, snap: dict) -> None:
        """Progress reported by the actor (`FineTuner.status`)."""
        for key in ("phase", "step", "loss", "details", "result"):
            if key in snap:
                setattr(self, key, snap[key])


def parse_params(params: dict | None) -> dict:
    """The POST body's fine-tune params (MONAI Label sends its own keys too: those are ignored)."""
    params = params or {}
    if not isinstance(params, dict):
        raise ValueError("params must be a JSON object")
    out = dict(PARAMS)
    for key, lo, hi, kind in (("max_steps", 1, MAX_STEPS, int), ("batch_size", 1, 64, int), ("lr", 0.0, 1.0, float)):
        v = params.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
            raise ValueError(f"{key} must be a{'n integer' if kind is int else ' number'}, got {v!r}")
        if not (lo < v <= hi if kind is float else lo <= v <= hi):
            raise ValueError(f"{key} must be in {'(' if kind is float else '['}{lo}, {hi}], got {v!r}")
        out[key] = kind(v)
    return out


def run_paths(store: Path, run_id: str) -> dict:
    """Where a run works and what it publishes (under the facade's store)."""
    ckpt = Path(store) / "checkpoints" / f"vessa-{run_id}.pt"
    return {
        "work": str(Path(store) / "train" / run_id),
        "ckpt": str(ckpt),
        "config": str(ckpt.with_name(ckpt.stem + ".config.resolved.yaml")),
    }


def remove_run(paths: dict) -> None:
    """A stopped run leaves nothing: its work directory and anything it published."""
    if paths.get("work"):
        shutil.rmtree(paths["work"], ignore_errors=True)
    for key in ("ckpt", "config"):
        if paths.get(key):
            Path(paths[key]).unlink(missing_ok=True)


def trainer_info(facade) -> tuple[dict, dict]:
    """(`trainers`, `train_stats`) of GET /info/."""
    trainers = {TRAINER: {"description": DESCRIPTION, "config": {}}}
    run: TrainRun | None = facade.train_run
    if run is None:
        return trainers, {}
    stats = {
        "status": run.status,
        "start_ts": int(run.start_ts),
        "total_time": round((run.end_ts or time.time()) - run.start_ts, 3) if run.end_ts else None,
        "epoch": run.step,
        "total_epochs": run.params.get("max_steps", 0),
        "best_metric": 0.0,  # no validation metric: a short fine-tune on the corrections
        "loss": run.loss,
        **{k: v for k, v in run.result.items() if k in ("bank_version", "added_cases", "model", "checkpoint")},
    }
    return trainers, {TRAINER: stats}


def pending(ds: Datastore) -> list[tuple[str, FinalLabel]]:
    """Images whose newest final label is not in the bank yet."""
    out = []
    for img in ds.images().values():
        fin = ds.final(img)
        if fin is not None and not (fin.review.bank_version is not None and fin.review.added_label == fin.version.path):
            out.append((img.id, fin))
    return out


async def run_bank_update(
    run: TrainRun,
    ds: Datastore,
    limits: Limits,
    classes: list[dict],
    add_templates: Callable[..., Awaitable[dict]],
) -> None:
    """The run's body: each pending correction through `add_templates` (a replica call)."""
    table = [{"index": c["index"], "name": c["name"]} for c in classes]
    added: dict[str, int] = {}
    skipped: dict[str, str] = {}
    version = None
    try:
        todo = await asyncio.to_thread(pending, ds)
        run.details.append(f"{len(todo)} corrected case(s) not in the bank yet")
        for image_id, fin in todo:
            if run.stop:
                run.status = "STOPPED"
                break
            img = await asyncio.to_thread(ds.image, image_id)
            vol = await asyncio.to_thread(read_image, img.path, limits, img.id)
            lab = await asyncio.to_thread(load_label_nifti, fin.path, tuple(vol.meta["axes"]))
            if not lab.any():
                skipped[image_id] = "no foreground"
                continue
            case = re.sub(r"[^A-Za-z0-9_-]", "-", f"ml-{fin.review.case_id}")[:40] + f"-v{fin.version.version}"
            res = await add_templates(vol.image.astype(np.float32), lab.astype(np.uint8), table, case, case)
            if "error" in res:
                skipped[image_id] = res["error"]
                continue
            version = int(res["version"])
            added[image_id] = len(res.get("added", []))
            await asyncio.to_thread(ds.mark_in_bank, fin, version)
            run.details.append(f"{image_id}: {added[image_id]} exemplar(s), bank version {version}")
    except Exception as exc:  # reported in the run's status, as MONAI Label reports a failed task
        run.status = "ERROR"
        run.details.append(f"{type(exc).__name__}: {exc}")
    run.result = {"added_cases": added, "skipped": skipped, "bank_version": version}


def stage1_settings(source: dict, bank: str, out: Path, params: dict):
    """The fine-tune's Stage1Settings: the served checkpoint's own training settings (its train_config),
    starting from its weights, on the grown bank, for `max_steps` steps with a short warm-up."""
    from assistant_server.checkpoint import read_checkpoint
    from assistant_server.training.stage1 import Stage1Settings

    ckpt = source["ckpt"]
    base: dict = {"encoder": source["encoder"]}
    if ckpt not in (None, "", "random", "pretrained"):
        cfg = read_checkpoint(ckpt)["train_config"]
        own = set(Stage1Settings.model_fields) - {
            "bank", "out", "steps", "resume", "init", "device", "threads", "save_every", "log_every",
            "augment_store", "pseudo_bank", "p_pseudo", "batch_size", "lr", "warmup_steps",
        }  # fmt: skip
        base.update({k: v for k, v in cfg.items() if k in own})
    steps = params["max_steps"]
    extra = {"lr": params["lr"], "lr_new": params["lr"] * 10} if params.get("lr") else {}
    # This run's own settings win over the source's: a fine-tune's checkpoint carries them in its
    # train_config too, so a second fine-tune must replace them, not pass them twice.
    return Stage1Settings(
        **{
            **base,
            **extra,
            "bank": Path(bank),
            "out": out,
            "init": ckpt or "pretrained",
            "steps": steps,
            "batch_size": params["batch_size"],
            "warmup_steps": max(1, min(50, steps // 10)),
            "save_every": steps + 1,  # no intermediate checkpoints: a stopped run is discarded
            "log_every": 1,
            "augment_views": 0,
            "p_pseudo": 0.0,
            "pseudo_bank": None,
        }
    )


@ray.remote(num_cpus=0, max_restarts=0)
class FineTuner:
    """One training run, in its own Ray worker: bank update (replicas encode), then the fine-tune (here).
    Async actor: `status` answers while `run` works (the fine-tune runs in a thread)."""

    def __init__(self, run_id: str, app_name: str, datastore: dict, limits: dict, classes: list[dict], params: dict):
        self.run = TrainRun(id=run_id, params=params)
        self.app_name = app_name
        self.datastore = datastore
        self.limits = Limits(**limits)
        self.classes = classes
        self.paths = run_paths(Path(datastore["store"]), run_id)

    async def status(self) -> dict:
        r = self.run
        return {"phase": r.phase, "step": r.step, "loss": r.loss, "details": list(r.details), "result": dict(r.result)}

    async def go(self) -> dict:
        """The whole run; returns {"status": DONE, "ckpt": path} or {"status": ERROR, "error": ...}."""
        from ray import serve

        run = self.run
        ds = Datastore(**{k: Path(v) if v else None for k, v in self.datastore.items()})
        handle = serve.get_deployment_handle("VessaAssistant", app_name=self.app_name)

        async def add_templates(*args):
            return await handle.add_templates.remote(*args)

        await run_bank_update(run, ds, self.limits, self.classes, add_templates)
        if run.status == "ERROR":
            return {"status": "ERROR", "error": run.details[-1] if run.details else "bank update failed"}
        try:
            run.phase = "train"
            source = await handle.training_source.remote()
            work = Path(self.paths["work"])
            settings = stage1_settings(source, source["bank"], work / "model.pt", run.params)
            run.details.append(f"fine-tuning {source['model']} for {settings.steps} step(s)")

            def progress(step: int, losses: dict) -> None:
                run.step, run.loss = step, round(float(losses["loss"]), 5)

            from assistant_server.training.stage1 import train_stage1

            out = await asyncio.to_thread(train_stage1, settings, progress)
            run.phase = "publish"
            ckpt, config = Path(self.paths["ckpt"]), Path(self.paths["config"])
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "model.config.resolved.yaml", config)
            os.replace(out, ckpt)  # same file system: the new checkpoint appears whole or not at all
            (work / "model.latest.pt").unlink(missing_ok=True)  # the optimizer state is not kept
            run.details.append(f"wrote {ckpt.name}")
        except Exception as exc:  # reported in the run's status
            run.details.append(f"{type(exc).__name__}: {exc}")
            return {"status": "ERROR", "error": f"{type(exc).__name__}: {exc}"}
        return {"status": "DONE", "ckpt": str(ckpt), "result": run.result, "details": run.details}

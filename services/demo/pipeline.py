"""`vessa demo`: the whole of VESSA on the embedded default, on a machine with nothing running.

1. data      the synthetic cardiac dataset (or --data)
2. bank      a template bank of the labeled cases (LiteMedSAM embeddings, MiniLM class texts)
3. assistant brief Stage-1 training on the bank
4. serve     local Ray Serve (CPU profile) + an embedded Redis + a dispatcher process
5. warm      every unlabeled slice through the Redis path once (templates-only pseudo-labels; the
             assistant caches its embeddings, so training requests later travel by hash)
   label     the unlabeled cases as a labeling job through the Redis path (`vessa label`'s runner:
             NIfTI labels, manifest, ranking by confidence; docs/jobs.md)
6. students  BCP without the assistant, then BCP with VESSA in the loop (Redis path)
7. evaluate  both students on the validation volumes (NIfTI predictions written)
8. report    report.md + overlays (image, ground truth, pseudo-label, predictions) + Dice over iterations
and stops everything it started.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import typer

STEPS = ["data", "bank", "assistant", "serve", "warm", "label", "baseline student", "VESSA student", "evaluate", "report"]


class Progress:
    """One line per stage with elapsed time: the demo's progress display (stages have their own bars)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.i = 0
        self.seconds: dict[str, float] = {}  # per finished stage, for the report
        self._current: tuple[str, float] | None = None

    def stage(self, name: str, detail: str = "") -> None:
        now = time.perf_counter()
        if self._current is not None:
            self.seconds[self._current[0]] = now - self._current[1]
        self._current = (name, now)
        self.i += 1
        typer.secho(
            f"\n[{self.i}/{len(STEPS)}] {name}  ({now - self.t0:5.0f} s){'  ' + detail if detail else ''}",
            bold=True,
        )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), help="output directory (report, checkpoints, predictions)"),
    data: Path | None = typer.Option(None, help="dataset to use instead of generating the synthetic one"),
    cases: int = typer.Option(12, help="synthetic cases to generate"),
    seed: int = typer.Option(0, help="seed of the data, the assistant and the students"),
    labeled: int = typer.Option(2, help="labeled patients (the first N, protocol order)"),
    assistant_steps: int = typer.Option(200, help="Stage-1 training steps of the assistant"),
    pretrain_iters: int = typer.Option(60, help="BCP pre-training iterations"),
    self_train_iters: int = typer.Option(240, help="BCP self-training iterations"),
    image_size: int = typer.Option(128, help="student input size (the assistant always sees 256×256)"),
    port: int = typer.Option(0, help="HTTP port of the local Serve app (0: a free one)"),
):
    """Run the whole pipeline on the embedded default and write a report (about 7 minutes on 2 CPU cores)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    p = Progress()
    started: dict = {}
    try:
        report = _run(out, data, cases, seed, labeled, assistant_steps, pretrain_iters, self_train_iters, image_size, port, p, started)
    finally:
        _stop(started)
    typer.secho(f"\ndone in {p.elapsed / 60:.1f} min: {out / 'report.md'}", bold=True)
    typer.echo(report["summary_table"])


def _run(out, data, cases, seed, labeled, assistant_steps, pretrain_iters, self_train_iters, image_size, port, p, started) -> dict:
    import torch

    from assistant_server.precision import cpu_bf16_fast

    cores = max(1, os.cpu_count() or 1)
    torch.set_num_threads(cores)
    # bf16 on the CPU (bank, Stage-1, replica) where it has native kernels: about 2x faster there, the
    # same pseudo-labels on 99.97% of pixels (docs/benchmarks.md, "bf16 on the CPU")
    bf16 = cpu_bf16_fast()
    # 1. data --------------------------------------------------------------------------------------
    if data is None:
        from shared.data.synth import write_msd_dataset

        data = out / "data"
        p.stage("data", f"synthetic cardiac MRI, {cases} cases, seed {seed} → {data}")
        if not (data / "dataset.json").exists():
            write_msd_dataset(data, cases=cases, seed=seed, progress=True)
    else:
        p.stage("data", f"using {data}")
    data = Path(data).resolve()
    # 2. bank --------------------------------------------------------------------------------------
    from assistant_server.bank_builder import build_bank

    bank = out / "bank"
    p.stage("bank", f"labeled patients: first {labeled}")
    if not (bank / "manifest.json").exists():
        build_bank(data, labeled, bank, device="cpu", cpu_bf16=bf16)
    # 3. assistant -----------------------------------------------------------------------------------
    from assistant_server.training.stage1 import Stage1Settings, train_stage1

    ckpt = out / "assistant" / "assistant.pt"
    p.stage("assistant", f"Stage-1 training, {assistant_steps} steps")
    if not ckpt.exists():
        train_stage1(
            Stage1Settings(
                bank=bank, out=ckpt, steps=assistant_steps, batch_size=2, seed=seed, save_every=10**6, log_every=5,
                device="cpu", cpu_bf16=bf16,
            )
        )
    # 4. serve -------------------------------------------------------------------------------------
    import ray
    from ray import serve

    from services.ingress.app import all_cores_runtime_env, build_app
    from services.runtime.redis_server import EmbeddedRedis, free_port

    p.stage("serve", "local Ray Serve (CPU profile) + embedded Redis + dispatcher")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    started["ray"] = True
    port = port or free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cpu0 = {"ray_actor_options": {"num_cpus": 0}}
    # the demo owns the machine: the assistant may use every core (its encoder is the longest step);
    # while the VESSA student trains beside it, each gets a share (_share_cores)
    all_cores = {
        "ray_actor_options": {"num_cpus": 0, "runtime_env": all_cores_runtime_env()},
        "user_config": {"torch_threads": cores},
    }
    serve.run(
        build_app(
            {"ckpt": str(ckpt), "bank": str(bank), "encoder": "litemedsam", "device": "cpu", "max_batch_slices": 16, "cache_device_entries": 100_000, "cpu_bf16": bf16},
            {"VessaAssistant": all_cores, "VessaIngress": cpu0},
        ),
        name="vessa",
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{port}"
    redis_server = EmbeddedRedis(out / "redis").start()
    started["redis"] = redis_server
    log = open(out / "dispatcher.log", "ab")
    started["dispatcher"] = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "dispatcher", "--redis-url", redis_server.url, "--ray-address", ray.get_runtime_context().gcs_address],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, VESSA_REDIS_URL=redis_server.url),
    )
    typer.echo(f"  REST API {url} (docs at {url}/docs); Redis {redis_server.url}")
    # 5. warm --------------------------------------------------------------------------------------
    p.stage("warm", "every unlabeled slice through the Redis path once (templates-only)")
    pseudo = asyncio.run(_warm(redis_server.url, data, labeled))
    p.stage("label", "the unlabeled cases as a labeling job through the Redis path")
    labeling = _label_unlabeled(redis_server.url, data, labeled, out / "labels")
    # 6-7. students ----------------------------------------------------------------------------------
    from shared.config import load_settings
    from student_trainer.config import TrainSettings
    from student_trainer.train import train

    common = {
        "seed": seed,
        "device": "cpu",
        "data": {"root": str(data), "n_labeled": labeled, "image_size": image_size},
        "batch_size": 8,
        "labeled_bs": 4,
        "max_iters": self_train_iters,
        "val_every": max(5, self_train_iters // 8),
        "save_every": self_train_iters,
        "log_every": 5,
        "optim": {"schedule": "constant"},
        "bcp": {"pretrain_iters": pretrain_iters},
        "final_eval": True,
        "num_threads": cores,
    }
    results = {}
    p.stage("baseline student", f"BCP, {pretrain_iters} + {self_train_iters} iterations")
    results["bcp"] = train(load_settings(TrainSettings, None, method="bcp", out_dir=out / "student_bcp", **common))
    p.stage("VESSA student", "BCP + VESSA pseudo-labels over Redis (same seed, same schedule)")
    vessa_cfg = {
        "link": "student_trainer.stream_link:StreamAssistantLink",
        "link_kwargs": {"redis_url": redis_server.url, "trainer_id": "demo", "max_in_flight": 8},
        # templates-only for the first three quarters (answers the warm stage already computed and the
        # assistant remembers), then the feedback loop: the teacher's softmax becomes the prompt
        "warmup_iters": (3 * self_train_iters) // 4,
        "prefetch": 4,
        "timeout_s": 60.0,
        "log_every": 10,
        # a young teacher is unsure everywhere: take the assistant's organs where it is confident of
        # them, never its background over an organ the teacher found (student_trainer/fusion.py)
        "fusion": {"mode": "assistant_confident", "tau": 0.5, "background_overrides": False},
    }
    trainer_threads = _share_cores(cores)
    results["bcp_vessa"] = train(
        load_settings(
            TrainSettings,
            None,
            method="bcp_vessa",
            out_dir=out / "student_vessa",
            vessa=vessa_cfg,
            **{**common, "num_threads": trainer_threads},
        )
    )
    _set_replica_threads(cores)
    # 8. evaluate ----------------------------------------------------------------------------------
    from student_trainer.evaluate import run_eval

    p.stage("evaluate", "validation volumes: Dice, Jaccard, HD95, ASD; NIfTI predictions")
    evals = {}
    for name, sub in (("bcp", "student_bcp"), ("bcp_vessa", "student_vessa")):
        evals[name] = run_eval(out / sub / "best.pt", data, "val", out_dir=out / "eval" / name, device="cpu")
    # 9. report ------------------------------------------------------------------------------------
    p.stage("report", str(out / "report.md"))
    from services.demo.report import write_report

    schedule = {
        "labeled_patients": labeled,
        "assistant_steps": assistant_steps,
        "pretrain_iters": pretrain_iters,
        "self_train_iters": self_train_iters,
        "templates_only_iters": vessa_cfg["warmup_iters"],
        "fusion": vessa_cfg["fusion"],
        "image_size": image_size,
        "cpu_bf16": bf16,
    }
    return write_report(out, data, url, results, evals, pseudo, p.elapsed, schedule, p.seconds, labeling=labeling)


def _set_replica_threads(n: int) -> None:
    """The assistant replica's torch threads, changed in place (its embedding cache stays). The demo runs
    one replica, so one handle call reaches it; a config file's `user_config` does the same for all."""
    from ray import serve

    serve.get_deployment_handle("VessaAssistant", app_name="vessa").reconfigure.remote({"torch_threads": n}).result()


def _share_cores(cores: int) -> int:
    """Split the cores between the trainer and the assistant replica while both work; returns the
    trainer's share. Two processes that each use every core run several times slower than either alone
    (their threads preempt each other), and that is what the VESSA student did before."""
    replica = max(1, cores // 2)
    _set_replica_threads(replica)
    return max(1, cores - replica)


async def _warm(redis_url: str, data: Path, labeled: int) -> dict:
    """Send every unlabeled canonical slice once; returns {slice key: (canonical image, pseudo-label)}."""
    from tqdm import tqdm

    from shared.data import open_dataset
    from shared.data.split import split_by_patient
    from shared.wire.canonical import canonical_slices
    from shared.wire.stream_client import AsyncStreamClient

    split = split_by_patient(open_dataset(data), labeled)
    pool = split.unlabeled
    client = AsyncStreamClient(redis_url, "demo-warm", max_in_flight=4)
    await client.start()
    out: dict = {}
    bar = tqdm(total=len(pool), desc="pseudo-labels", unit="slice")
    batch = 4
    pending = []
    for start in range(0, len(pool), batch):
        items = [pool[i] for i in range(start, min(start + batch, len(pool)))]
        images = canonical_slices([it.image for it in items])
        rid = await client.submit(images)
        pending.append((rid, items, images))
    for rid, items, images in pending:
        res = await client.result(rid, 900)
        if res is not None and res.status == "ok":
            for it, img, lab in zip(items, images, res.labels):
                out[it.ref.key] = (img, lab)
        bar.update(len(items))
    bar.close()
    await client.close()
    return out


def _label_unlabeled(redis_url: str, data: Path, labeled: int, out: Path) -> dict | None:
    """The unlabeled patients' cases through the label runner (the Redis path, like `vessa label
    --redis`); returns the summary and the ranking for the report, or None when the layout has no such
    cases as volumes (an SSL4MIS dataset keeps its unlabeled cases as slices only)."""
    from services.labeling.cases import discover
    from services.labeling.outputs import read_records
    from services.labeling.ranking import ranking
    from services.labeling.report import summary_table
    from services.labeling.runner import run_label_job
    from shared.data import open_dataset
    from shared.jobs import JobSpec

    ds = open_dataset(data)
    gold = set(ds.patients()[:labeled])
    unlabeled = {r.case_id for r in ds.slice_refs() if r.patient_id not in gold}
    volumes = {c.case_id for c in discover(data).cases}
    cases = sorted(unlabeled & volumes)
    if not cases:
        typer.echo("  no unlabeled cases stored as volumes: labeling step skipped")
        return None
    summary = run_label_job(JobSpec(data=str(data), out=str(out), cases=cases, selection="all"), redis_url)
    records = read_records(out)
    typer.echo(summary_table(records, summary))
    return {"out": out, "summary": summary, "ranking": ranking(records), "records": records}


def _stop(started: dict) -> None:
    disp = started.get("dispatcher")
    if disp is not None and disp.poll() is None:
        disp.terminate()
        try:
            disp.wait(30)
        except subprocess.TimeoutExpired:
            disp.kill()
    if started.get("ray"):
        # No serve.shutdown(): the demo owns this local Ray instance, and ray.shutdown() stops every
        # Serve actor with it; serve.shutdown() first kills the controller mid graceful_shutdown and Ray
        # prints that task's failure as a red error after a successful run.
        import ray

        ray.shutdown()
    if started.get("redis") is not None:
        started["redis"].stop()


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)



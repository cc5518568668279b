"""`vessa demo`: the whole of VESSA on the embedded default, on a machine with nothing running.

1. data      the synthetic cardiac dataset (or --data)
2. bank      a template bank of the labeled cases (LiteMedSAM embeddings, MiniLM class texts)
3. assistant brief Stage-1 training on the bank
4. serve     local Ray Serve (CPU profile) + an embedded Redis + a dispatcher process
5. label     the unlabeled cases as a labeling job through the Redis path with the closed loop
             (`vessa label --rounds K`'s runner, docs/jobs.md): round 0 the assistant's templates-only
             labels; each round a student learns from the labeled cases + the pseudo-labels and its
             softmax prompts the assistant's next labels; NIfTI labels, manifest, ranking by confidence
6. baseline  BCP alone (no assistant), as many student steps as the loop's students had in all
7. evaluate  BCP alone and every round's student on the validation volumes (NIfTI predictions written)
8. report    report.md: the per-round table, both students, overlays, Dice over student steps
and stops everything it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import typer

STEPS = ["data", "bank", "assistant", "serve", "label", "baseline student", "evaluate", "report"]


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
    out: Path = typer.Option(Path("runs/demo"), help="output directory (report, checkpoints, labels, predictions)"),
    data: Path | None = typer.Option(None, help="dataset to use instead of generating the synthetic one"),
    cases: int = typer.Option(12, help="synthetic cases to generate"),
    seed: int = typer.Option(0, help="seed of the data, the assistant and the students"),
    labeled: int = typer.Option(2, help="labeled patients (the first N, protocol order)"),
    assistant_steps: int = typer.Option(200, help="Stage-1 training steps of the assistant"),
    rounds: int = typer.Option(2, min=1, max=20, help="rounds of the closed loop after the templates-only labels"),
    student_steps: int = typer.Option(200, min=10, help="student training steps per round (BCP alone gets rounds × this)"),
    image_size: int = typer.Option(128, help="student input size (the assistant always sees 256×256)"),
    port: int = typer.Option(0, help="HTTP port of the local Serve app (0: a free one)"),
):
    """Run the whole pipeline on the embedded default and write a report (10-15 minutes on 2 CPU cores)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    p = Progress()
    started: dict = {}
    try:
        report = _run(out, data, cases, seed, labeled, assistant_steps, rounds, student_steps, image_size, port, p, started)
    finally:
        _stop(started)
    typer.secho(f"\ndone in {p.elapsed / 60:.1f} min: {out / 'report.md'}", bold=True)
    typer.echo(report["summary_table"])


def _run(out, data, cases, seed, labeled, assistant_steps, rounds, student_steps, image_size, port, p, started) -> dict:
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
    # the demo owns the machine: the assistant may use every core while it labels, and the loop's
    # student trains in this process while the replica waits (they take turns, so no split is needed)
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
    # 5. label: the closed loop ----------------------------------------------------------------------
    from shared.jobs import LoopSpec

    loop = LoopSpec(labeled=labeled, steps=student_steps, image_size=image_size, seed=seed)
    p.stage("label", f"the unlabeled cases through the Redis path: round 0 + {rounds} rounds of the loop ({student_steps} student steps each)")
    labeling = _label_unlabeled(redis_server.url, data, labeled, out / "labels", rounds=rounds, loop=loop)
    # 6. BCP alone at the same budget --------------------------------------------------------------------
    from shared.config import load_settings
    from student_trainer.config import TrainSettings
    from student_trainer.train import train

    budget = rounds * student_steps
    pretrain = max(1, budget // 5)  # BCP's supervised warm-up, then its copy-paste self-training
    p.stage("baseline student", f"BCP alone (no assistant): {pretrain} + {budget - pretrain} steps, the loop's {rounds} × {student_steps}")
    bcp = train(
        load_settings(
            TrainSettings,
            None,
            method="bcp",
            out_dir=out / "student_bcp",
            seed=seed,
            device="cpu",
            data={"root": str(data), "n_labeled": labeled, "image_size": image_size},
            batch_size=loop.batch_size,
            labeled_bs=loop.batch_size // 2,
            max_iters=budget - pretrain,
            val_every=max(5, student_steps // 2),
            save_every=budget,
            log_every=10,
            bcp={"pretrain_iters": pretrain},
            final_eval=False,
            num_threads=cores,
        )
    )
    # 7. evaluate ----------------------------------------------------------------------------------
    from student_trainer.evaluate import run_eval

    p.stage("evaluate", "validation volumes: Dice, Jaccard, HD95, ASD; NIfTI predictions")
    # both students as they ended (neither picked on the validation volumes)
    bcp_eval = run_eval(out / "student_bcp" / "latest.pt", data, "val", out_dir=out / "eval" / "bcp", device="cpu")
    students = {row["round"]: labeling["out"] / row["student"] for row in labeling["rounds"] if row.get("student")}
    loop_evals = {
        r: run_eval(ckpt, data, "val", out_dir=out / "eval" / ("loop" if r == rounds else f"loop_round{r}"), device="cpu")
        for r, ckpt in students.items()
    }
    # 8. report ------------------------------------------------------------------------------------
    p.stage("report", str(out / "report.md"))
    from services.demo.report import write_report

    schedule = {
        "labeled_patients": labeled,
        "assistant_steps": assistant_steps,
        "rounds": rounds,
        "student_steps_per_round": student_steps,
        "bcp_alone_steps": {"pretrain": pretrain, "self_train": budget - pretrain},
        "image_size": image_size,
        "cpu_bf16": bf16,
        "seed": seed,
    }
    return write_report(out, data, url, bcp, bcp_eval, loop_evals, students, p.elapsed, schedule, p.seconds, labeling=labeling)


def _label_unlabeled(redis_url: str, data: Path, labeled: int, out: Path, rounds: int = 0, loop=None) -> dict | None:
    """The unlabeled patients' cases through the label runner (the Redis path, like `vessa label
    --redis`; with `rounds` the closed loop, `vessa label --rounds`); returns the summary, the ranking,
    the records and the per-round table for the report, or None when the layout has no such cases as
    volumes (an SSL4MIS dataset keeps its unlabeled cases as slices only)."""
    from services.labeling.cases import discover
    from services.labeling.outputs import read_manifest, read_records
    from services.labeling.progress import terminal_progress
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
        if rounds:
            raise typer.BadParameter(f"{data} keeps no unlabeled case as a volume: the loop has nothing to label", param_hint="--data")
        typer.echo("  no unlabeled cases stored as volumes: labeling step skipped")
        return None
    extra = {"rounds": rounds, "loop": loop} if rounds else {}
    job = JobSpec(data=str(data), out=str(out), cases=cases, selection="all", **extra)
    summary = run_label_job(job, redis_url, terminal_progress(), student_progress=True)
    records = read_records(out)
    typer.echo(summary_table(records, summary))
    table = read_manifest(out)["job"].get("rounds") or [] if rounds else []
    if table:
        from services.labeling.loop import rounds_table

        typer.echo(rounds_table(table))
    return {"out": Path(out), "summary": summary, "ranking": ranking(records), "records": records, "rounds": table}


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



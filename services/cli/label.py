"""`vessa label`: pseudo-label a whole dataset through the Redis request stream (docs/jobs.md).

    vessa label --data DIR --out DIR [--redis URL | --ckpt CKPT --bank BANK]
    vessa label --data DICOM-FOLDER --out DIR [--series UID]   (one case per series; SEGs in OUT/seg/)
    vessa label --data CINE-FOLDER --out DIR --temporal-context 0.2   (4D cines: a second pass per frame
        prompted with its neighbours in time)
    vessa label --dicomweb URL --study UID --out DIR [--series UID] [--store-seg]
        (a PACS: QIDO-RS, WADO-RS into OUT/dicomweb/<study>/, STOW-RS of the SEGs; credentials from
        VESSA_DICOMWEB_TOKEN or VESSA_DICOMWEB_USER/VESSA_DICOMWEB_PASSWORD)
    vessa label --url URL --data DIR-UNDER-THE-SERVICE'S-DATA-ROOT
    vessa label rank OUT [--suggest K]     vessa label score OUT --truth DIR

With `--redis` (or VESSA_REDIS_URL) this process runs the job against that service's request stream;
with `--url` the service's own runner actor runs it (POST /v1/jobs) and this process follows it;
with neither it starts the embedded default (local Ray Serve + Redis + dispatcher) with the assistant
named by `--ckpt`.
Exit code 0 when every case is labeled (or was already), 1 when any case failed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from services.cli.options import ENGINE_HELP, PRECISION_HELP, check_engine, check_engine_precision

label_app = typer.Typer(
    help="Label a whole dataset (resumable), then rank the labels for review and score them.",
    invoke_without_command=True,
    no_args_is_help=False,
)


def _int_list(text: str | None, what: str) -> list[int] | None:
    if not text:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if any(v < 1 or v > 255 for v in values):
        raise typer.BadParameter(f"{what} must lie in 1..255 (0 is the background)")
    return values


@label_app.callback()
def label_cmd(
    ctx: typer.Context,
    data: Path | None = typer.Option(None, "--data", help="dataset: nnU-Net/MSD, SSL4MIS HDF5, a folder of NIfTI files, or a folder of DICOM files (one case per series)"),
    series: str | None = typer.Option(None, "--series", help="DICOM: label only the series with this SeriesInstanceUID"),
    dicomweb: str | None = typer.Option(None, "--dicomweb", help="DICOMweb URL of a PACS (credentials from VESSA_DICOMWEB_TOKEN or VESSA_DICOMWEB_USER/PASSWORD)"),
    study: str | None = typer.Option(None, "--study", help="with --dicomweb: the StudyInstanceUID to label"),
    store_seg: bool = typer.Option(False, "--store-seg", help="with --dicomweb: store the DICOM-SEG results back on the PACS (STOW-RS)"),
    out: Path | None = typer.Option(None, "--out", help="output directory (labels/, records/, labels.json, labels.csv)"),
    url: str | None = typer.Option(None, "--url", help="REST URL of a running service: the job runs there (POST /v1/jobs; --data is then relative to its data root)"),
    token: str | None = typer.Option(None, "--token", envvar="VESSA_API_TOKEN", help="bearer token for --url"),
    redis_url: str | None = typer.Option(None, "--redis", envvar="VESSA_REDIS_URL", help="Redis of a running service (its dispatcher and replicas do the work)"),
    ckpt: str | None = typer.Option(None, "--ckpt", help="embedded default: assistant checkpoint ('random'/'pretrained' only when asked for by name)"),
    bank: Path | None = typer.Option(None, "--bank", help="embedded default: template bank"),
    encoder: str = typer.Option("litemedsam", help="embedded default: litemedsam or tiny"),
    device: str = typer.Option("cpu", help="embedded default: cpu or cuda"),
    replicas: int = typer.Option(1, min=1, help="embedded default: assistant replicas"),
    engine: str = typer.Option("auto", "--engine", help="embedded default: " + ENGINE_HELP),
    engine_precision: str = typer.Option("f32", "--engine-precision", help="embedded default: " + PRECISION_HELP),
    embed_store: Path | None = typer.Option(None, "--embed-store", help="embedded default: persisted encoder embeddings to read and fill (vessa assistant embed)"),
    cases: str | None = typer.Option(None, "--cases", help="comma-separated case ids (default: the selection below)"),
    all_cases: bool = typer.Option(False, "--all/--unlabeled", help="every case, or only cases without ground truth (default)"),
    classes: str | None = typer.Option(None, "--classes", help="comma-separated class indices (default: every class of the bank)"),
    probs: bool = typer.Option(False, "--probs", help="also write per-class probabilities: OUT/probs/<case>.nii.gz, 4D uint8 (p·255, background first)"),
    volume_calls: bool = typer.Option(True, "--volume-calls/--slice-calls", help="each case as one volume request (3D context and cleaning; default) or as independent slices in requests of --batch-slices"),
    batch_slices: int = typer.Option(8, min=1, max=64, help="slices per request with --slice-calls (and for cases over 1,024 slices)"),
    max_in_flight: int = typer.Option(4, min=1, max=64, help="requests of this job on the stream at once (bounds what a trainer waits behind)"),
    cases_in_flight: int = typer.Option(3, min=1, max=32, help="cases read / inferred / written at once"),
    timeout_s: float = typer.Option(900.0, "--timeout", min=1.0, help="seconds without any answer to this job before a waiting case fails"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar"),
    temporal_context: float = typer.Option(0.0, "--temporal-context", help="4D cines: weight w in [0, 1/3] of each frame's neighbours in time; > 0 adds a second pass per frame prompted with (1-2w)·P_t + w·P_t-1 + w·P_t+1 of the first (default 0: off)"),
    rounds: int = typer.Option(0, "--rounds", min=0, max=20, help="rounds of the closed loop after the templates-only labels: each trains a student on the labeled cases + pseudo-labels and relabels with its softmax as the prompt (docs/jobs.md)"),
    loop_config: Path | None = typer.Option(None, "--loop-config", help="YAML of the loop's student settings (the `loop` section of a job: labeled, steps, batch_size, image_size, min_confidence, weighted, warm_start, lr, seed, device)"),
    labeled: int | None = typer.Option(None, "--labeled", min=1, help="with --rounds: labeled patients the student trains on (the first N of the dataset's protocol order; default 3)"),
    student_steps: int | None = typer.Option(None, "--student-steps", min=1, help="with --rounds: student training steps per round (the CPU budget; default 1000)"),
    min_confidence: float | None = typer.Option(None, "--min-confidence", min=0.0, max=1.0, help="with --rounds: leave out pseudo-labeled slices less confident than this (default 0)"),
    student_device: str | None = typer.Option(None, "--student-device", help="with --rounds: where the student trains (cpu, cuda; default cpu)"),
):
    """Label every selected case: uint8 NIfTI per case in the input's geometry, a manifest, resumable."""
    if ctx.invoked_subcommand is not None:
        return
    if dicomweb is not None:
        if url:
            raise typer.BadParameter("--dicomweb runs here: leave out --url", param_hint="--dicomweb")
        if not study or out is None or data is not None:
            raise typer.BadParameter("--dicomweb needs --study UID and --out DIR (and no --data)", param_hint="--dicomweb")
        from services.labeling.dicomweb import check_url

        try:
            check_url(dicomweb)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--dicomweb") from None
        data = out / "dicomweb" / study  # the runner fetches the study here (WADO-RS)
    elif study is not None or store_seg:
        raise typer.BadParameter("--study and --store-seg go with --dicomweb", param_hint="--study")
    if series is not None:
        if cases:
            raise typer.BadParameter("--series and --cases exclude each other", param_hint="--series")
        cases = series.strip()  # a DICOM case's id is its SeriesInstanceUID
    loop = _loop_spec(loop_config, labeled, student_steps, min_confidence, student_device)
    if not 0.0 <= temporal_context <= 1 / 3:  # checked here too: before a remote job or an embedded service starts
        raise typer.BadParameter(f"the neighbours' weight must lie in [0, 1/3], got {temporal_context}", param_hint="--temporal-context")
    if url:
        if data is None:
            raise typer.BadParameter("--data is required (a dataset under the service's data root)")
        raise typer.Exit(_run_remote(url, token, str(data), cases, all_cases, classes, probs, batch_slices, max_in_flight, cases_in_flight, progress, rounds, loop, temporal_context))
    check_engine(engine)
    check_engine_precision(engine_precision)
    if data is None or out is None:
        raise typer.BadParameter("--data and --out are required (or use `vessa label rank|score`)")
    from pydantic import ValidationError

    from shared.jobs import JobSpec

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = _bank_class_names(bank) if bank is not None and not redis_url else None
    try:
        source = None
        if dicomweb is not None:
            from shared.jobs import DicomWebSource

            source = DicomWebSource(url=dicomweb, study=study, series=series, store_seg=store_seg)
        job = JobSpec(
            data=str(data.resolve()),
            dicomweb=source,
            class_names=names,
            out=str(out.resolve()),
            cases=[c.strip() for c in cases.split(",") if c.strip()] if cases else None,
            selection="all" if all_cases else "unlabeled",
            classes=_int_list(classes, "--classes"),
            probs=probs,
            volume_calls=volume_calls,
            batch_slices=batch_slices,
            max_in_flight=max_in_flight,
            cases_in_flight=cases_in_flight,
            timeout_s=timeout_s,
            rounds=rounds,
            loop=loop,
            temporal_context=temporal_context,
        )
    except ValidationError as exc:  # a bad case id or class index: a usage error, named
        raise typer.BadParameter("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    if source is None and not Path(job.data).is_dir():
        raise typer.BadParameter(f"dataset directory not found: {data}", param_hint="--data")
    if redis_url:
        summary = _run(job, redis_url, progress)

    else:
        if ckpt is None or bank is None:
            raise typer.BadParameter(
                "no running service given (--redis or VESSA_REDIS_URL) and no assistant for the embedded "
                "default: pass --ckpt CKPT --bank BANK (untrained parts only when asked for: --ckpt random)"
            )
        from services.labeling.embedded import embedded_service

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        typer.echo("starting the embedded default (local Ray Serve + Redis + dispatcher)…", err=True)
        store = embed_store.resolve() if embed_store else None
        with embedded_service(ckpt, bank.resolve(), Path(job.out) / ".service", encoder, device, replicas, store, engine, engine_precision) as url:
            summary = _run(job, url, progress)
    if summary.stored:
        typer.echo(f"stored {summary.stored} DICOM-SEG instance(s) on the PACS (STOW-RS)")
    raise typer.Exit(1 if summary.failed else 0)


def _loop_spec(path: Path | None, labeled, steps, min_confidence, device) -> dict:
    """The job's `loop` section: the YAML file's keys, then the flags given."""
    import yaml

    spec: dict = {}
    if path is not None:
        if not path.is_file():
            raise typer.BadParameter(f"loop config not found: {path}", param_hint="--loop-config")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise typer.BadParameter("the loop config must be a YAML mapping", param_hint="--loop-config")
        spec.update(loaded.get("loop", loaded))
    for key, value in (("labeled", labeled), ("steps", steps), ("min_confidence", min_confidence), ("device", device)):
        if value is not None:
            spec[key] = value
    from pydantic import ValidationError

    from shared.jobs import LoopSpec

    try:
        return LoopSpec(**spec).model_dump()
    except (ValidationError, TypeError) as exc:
        raise typer.BadParameter(f"loop settings: {exc}", param_hint="--loop-config") from None


def _bank_class_names(bank: Path) -> dict[int, str] | None:
    """{index: name} of the bank's class table (named segments in a DICOM-SEG); None when unreadable."""
    import json

    try:
        items = json.loads((bank / "manifest.json").read_text())["classes"]
        return {int(c["index"]): str(c["name"])[:64] for c in items if int(c["index"]) != 0}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _run_remote(url, token, data, cases, all_cases, classes, probs, batch_slices, max_in_flight, cases_in_flight, show_progress, rounds=0, loop=None, temporal_context=0.0) -> int:
    """The job on a running service (its runner actor does the work); follows it until it ends."""
    import time

    from tqdm import tqdm

    from services.ingress.client import AssistantClient

    client = AssistantClient(url, token=token, timeout=60)
    created = client.label_dataset(
        data,
        cases=[c.strip() for c in cases.split(",") if c.strip()] if cases else None,
        selection="all" if all_cases else "unlabeled",
        classes=_int_list(classes, "--classes"),
        probs=probs,
        batch_slices=batch_slices,
        max_in_flight=max_in_flight,
        cases_in_flight=cases_in_flight,
        **({"rounds": rounds, "loop": loop} if rounds else {}),
        **({"temporal_context": temporal_context} if temporal_context else {}),
    )
    job_id = created["job_id"]
    typer.echo(f"job {job_id}: {created['data']} → {created['out']}", err=True)
    bar = tqdm(total=0, unit="slice", desc=f"job {job_id}", disable=not show_progress, dynamic_ncols=True)
    try:
        while True:
            job = client.job(job_id)
            if job["slices_total"] and bar.total != job["slices_total"]:
                bar.total = job["slices_total"]
                bar.refresh()
            bar.update(job["slices_done"] - bar.n)
            c = job["counts"]
            where = f"round {job['round']}/{rounds} " if rounds and job.get("round") is not None else ""
            bar.set_postfix_str(f"{where}{job['state']} cases {c['labeled'] + c['skipped'] + c['failed']}/{c['cases']} failed {c['failed']}")
            if job["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        client.cancel_job(job_id)
        typer.echo(f"\ncancel requested for job {job_id} (finished outputs stay)", err=True)
        return 130
    finally:
        bar.close()
    c = job["counts"]
    for case, err in list(job["errors"].items())[:20]:
        typer.echo(f"failed  {case}: {err}")
    typer.echo(
        f"job {job_id} {job['state']}: {c['cases']} cases, {c['labeled']} labeled, {c['skipped']} already done, "
        f"{c['failed']} failed; {job['slices_per_s']:.2f} slices/s; outputs in {created['out']} (on the service's storage)"
    )
    if job.get("rounds"):
        from services.labeling.loop import rounds_table

        typer.echo(rounds_table(job["rounds"]))
    if job["state"] == "failed":
        typer.echo(f"error: {job['error']}", err=True)
    return 1 if job["state"] != "done" or c["failed"] else 0


def _run(job, redis_url: str, show_progress: bool):
    from services.labeling.progress import terminal_progress
    from services.labeling.report import summary_table
    from services.labeling.runner import run_label_job

    summary = run_label_job(job, redis_url, terminal_progress(show_progress), student_progress=show_progress)
    from services.labeling.outputs import read_records

    typer.echo(summary_table(read_records(Path(job.out)), summary))
    if job.rounds:
        from services.labeling.loop import rounds_table
        from services.labeling.outputs import read_manifest

        typer.echo(rounds_table(read_manifest(Path(job.out))["job"]["rounds"]))
        typer.echo(f"students: {Path(job.out) / 'rounds'}/<r>/student.pt (vessa predict --ckpt …)")
    typer.echo(f"labels: {Path(job.out) / 'labels'}   manifest: {Path(job.out) / 'labels.json'}")
    return summary


@label_app.command("rank")
def rank_cmd(
    out: Path = typer.Argument(..., help="a labeling output directory (vessa label --out)"),
    suggest: int = typer.Option(0, "--suggest", min=0, help="pick K cases to label next (low confidence and diverse)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
):
    """Cases from least to most trusted; with --suggest K, the K an expert should label next."""
    import json

    from services.labeling.outputs import read_records
    from services.labeling.ranking import ranking
    from services.labeling.ranking import suggest as suggest_cases

    if not (out / "records").is_dir():
        raise typer.BadParameter(f"no labeling output at {out} (records/ missing)", param_hint="OUT")
    records = read_records(out)
    rows = suggest_cases(records, out, suggest) if suggest else ranking(records)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    names = sorted({n for r in rows for n in r["classes"]})
    head = f"{'pick' if suggest else 'rank':>4}  {'case':<28} {'conf':>6}  " + " ".join(f"{n[:8]:>8}" for n in names) + "  worst class"
    typer.echo(head)
    typer.echo("-" * len(head))
    for r in rows:
        per = " ".join(f"{r['classes'][n]:8.3f}" if r["classes"].get(n) is not None else f"{'-':>8}" for n in names)
        cine = ""
        if r.get("frames"):  # a 4D cine: its least trusted frame
            worst = next(f for f in r["frames"] if f["frame"] == r["worst_frame"])
            cine = f"  ({len(r['frames'])} frames, worst t={worst['frame']}: {worst['confidence'] or 0:.3f})"
        typer.echo(f"{r.get('pick', r['rank']):>4}  {r['case_id'][:28]:<28} {r['confidence'] or 0:6.3f}  {per}  {r['worst_class'] or '-'}{cine}")
    failed = sum(rec.status != "ok" for rec in records.values())
    if failed:
        typer.echo(f"({failed} failed cases are not ranked; see labels.json)")


@label_app.command("score")
def score_cmd(
    out: Path = typer.Argument(..., help="a labeling output directory (vessa label --out)"),
    truth: Path = typer.Option(..., "--truth", help="ground truth: a dataset (MSD labelsTr/, SSL4MIS volumes/) or a folder of <case>.nii.gz"),
):
    """Written labels against ground truth: per-case and per-class Dice and HD95, and the Spearman
    correlation between case confidence and true Dice (written to OUT/score.json)."""
    from services.labeling.scoring import score, score_table

    if not (out / "records").is_dir():
        raise typer.BadParameter(f"no labeling output at {out} (records/ missing)", param_hint="OUT")
    if not truth.is_dir():
        raise typer.BadParameter(f"ground-truth directory not found: {truth}", param_hint="--truth")
    typer.echo(score_table(score(out, truth)))


def register(app: typer.Typer) -> None:
    app.add_typer(label_app, name="label")

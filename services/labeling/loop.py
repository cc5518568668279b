"""The closed loop as a labeling mode: `vessa label … --rounds K` (`JobSpec.rounds`, `POST /v1/jobs`).

    round 0      the assistant's templates-only labels for every selected case (a plain job)
    round r ≥ 1  a student trains on the dataset's labeled cases plus round r-1's pseudo-labels
                 (each pseudo-labeled slice weighted by the assistant's confidence in it, slices under
                 `loop.min_confidence` left out), with the Stage-2 trainer's `pseudo_labels` method
                 (BCP's copy-paste between labeled and pseudo-labeled halves, `loop.steps` steps); then
                 every case is labeled again with the student's softmax as the assistant's prompt

Outputs, besides a plain job's:

    OUT/rounds/<r>/                 round r as a whole job OUT (labels/, records/, labels.json, score.json)
    OUT/rounds/<r>/student.pt       round r's student (a `vessa predict` checkpoint), r ≥ 1
    OUT/rounds/<r>/train/           the trainer's run (latest.pt, its config, TensorBoard)
    OUT/rounds/<r>/round.json       written when round r is finished: its row of the table and its key
    OUT/labels/, records/, labels.json   the last round's labels, published; the manifest's `job.rounds`
                                         holds the per-round table, and the ranking reads these records

Ground truth: training reads the labels of the dataset's first `loop.labeled` patients only (the labeled
pool of `shared.data.split`, through `student_trainer.data.load_training_data`); a selected case's
image is read as the job reads it (`cases.read_case`, images only) and its label comes from the job's
own label file. A round's Dice is computed afterwards by `scoring.score`, the only code here that reads
any other ground truth, and nothing it computes reaches training.

Resume: a round whose `round.json` holds the same key (the loop settings, the selection, the model and
bank versions) and no failed case is not redone; a round's student is kept once `student.pt` is written
(its key inside); the labeling pass of a round resumes per case like any job (the runner's records in
OUT/rounds/<r>). A kill during a round's training retrains that round's student (a few minutes at most
at the CPU budget).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from services.labeling.cases import case_input, read_case
from services.labeling.outputs import (
    CaseRecord,
    read_records,
    remove_partials,
    write_atomic,
    write_manifest,
    write_record,
)
from services.labeling.runner import Event, JobSummary, LabelRunner
from shared.data.pseudo import PseudoLabeledSlices
from shared.jobs import JobSpec
from shared.wire.messages import BULK_STREAM

log = logging.getLogger("vessa.label.loop")

ROUND_FILE = "round.json"
STUDENT_FILE = "student.pt"


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / "rounds" / str(r)


def read_round(out: Path, r: int) -> dict | None:
    path = round_dir(out, r) / ROUND_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def labeled_set(data: Path, n_labeled: int) -> tuple[set[str], set[str]]:
    """(case ids, patient ids) of the dataset's labeled cases: the first `n_labeled` patients of its
    protocol order (`shared.data.split`). Only their ground truth is ever read by training."""
    from shared.data.layouts import open_dataset
    from shared.data.split import split_by_patient

    try:
        ds = open_dataset(data)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(
            f"the loop (rounds > 0) trains a student on the dataset's labeled cases, and {data} has none it can "
            f"read: {exc}"
        ) from None
    split = split_by_patient(ds, n_labeled)
    return {r.case_id for r in split.labeled.refs}, set(split.labeled.patients)


def _is_labeled(case_id: str, cases: set[str], patients: set[str]) -> bool:
    from shared.data.base import patient_of_case

    return case_id in cases or case_id in patients or patient_of_case(case_id) in patients


def slice_weights(rec: CaseRecord) -> np.ndarray:
    """The assistant's confidence per slice of a case: the mean over the foreground classes it was asked
    for (the record's `slice_confidence`, background first); the case's confidence where a slice has none."""
    rows = rec.slice_confidence or []
    default = float(rec.confidence or 0.0)
    out = []
    for row in rows:
        fg = [float(v) for v in row[1:] if v is not None and np.isfinite(v)]
        out.append(float(np.mean(fg)) if fg else default)
    return np.clip(np.asarray(out, np.float32), 0.0, 1.0)


def pseudo_slices(
    out: Path,
    records: dict[str, CaseRecord],
    labeled_cases: set[str],
    labeled_patients: set[str],
    min_confidence: float = 0.0,
    weighted: bool = True,
) -> PseudoLabeledSlices:
    """A round's pseudo-labeled training slices from a labeling pass at `out`: every ok case that is not
    one of the dataset's labeled cases, its image as the job read it (canonical 256×256 slices, what
    the assistant saw) and the pass's label file, resized the same way (nearest); slices whose
    confidence is under `min_confidence` are left out. 4D cines and DICOM series are not used (their
    frames would need their own reading here); they are still relabeled."""
    from shared.data.nifti import load_label_nifti
    from shared.data.resize import resize_label
    from shared.wire.canonical import CANONICAL_SIZE, canonical_slices

    size = (CANONICAL_SIZE, CANONICAL_SIZE)
    images, labels, weights, keys, cases = [], [], [], [], []
    dropped: dict[str, int] = {}
    for case_id, rec in sorted(records.items()):
        if rec.status != "ok" or not rec.output or rec.frames is not None:
            continue
        if _is_labeled(case_id, labeled_cases, labeled_patients):
            continue  # its ground truth is in the labeled pool
        case = case_input(case_id, Path(rec.input))
        if case.kind not in ("nifti", "h5"):
            continue
        vol = read_case(case)
        axes = (2, 0, 1) if case.kind == "h5" else vol.meta.get("axes")
        lab = load_label_nifti(Path(out) / rec.output, axes=axes)
        if lab.shape != vol.image.shape:
            log.warning("case %s: label %s and image %s differ; left out of training", case_id, lab.shape, vol.image.shape)
            continue
        canon = canonical_slices(list(vol.image)).astype(np.float32) / 255.0
        w = slice_weights(rec)
        if len(w) != len(canon):
            w = np.full(len(canon), float(rec.confidence or 0.0), np.float32)
        for k in range(len(canon)):
            if w[k] < min_confidence:
                dropped[case_id] = dropped.get(case_id, 0) + 1
                continue
            images.append(canon[k])
            labels.append(resize_label(lab[k], size).astype(np.uint8))
            weights.append(float(w[k]) if weighted else 1.0)
            keys.append(f"{case_id}_slice_{k}")
            cases.append(case_id)
    if not keys:
        empty = PseudoLabeledSlices.empty(CANONICAL_SIZE)
        empty.dropped = dropped
        return empty
    return PseudoLabeledSlices(
        np.stack(images).astype(np.float32),
        np.stack(labels).astype(np.uint8),
        np.asarray(weights, np.float32),
        keys,
        cases,
        dropped,
    )


def train_settings(job: JobSpec, out_dir: Path, r: int, progress: bool = False):
    """The Stage-2 trainer's settings for round r's student (student_trainer/config.py); `progress`: the
    trainer's progress bar on the terminal (a local `vessa label`, the demo; not in a service's actor)."""
    from student_trainer.config import TrainSettings

    lp = job.loop
    return TrainSettings(
        method="pseudo_labels",
        seed=lp.seed + r,
        out_dir=out_dir,
        device=lp.device,
        batch_size=lp.batch_size,
        labeled_bs=lp.batch_size // 2,
        max_iters=lp.steps,
        val_every=lp.steps,
        save_every=lp.steps,
        log_every=max(1, min(20, lp.steps)),
        final_eval=False,
        progress=progress,
        data={"root": Path(job.data), "n_labeled": lp.labeled, "image_size": lp.image_size, "val_split": ""},
        optim={"lr": lp.lr, "schedule": "poly"},
        bcp={"u_weight": 1.0},
    )


def train_student(job: JobSpec, pseudo: PseudoLabeledSlices, rdir: Path, r: int, key: str, init: Path | None, progress: bool = False) -> dict:
    """Round r's student: trained with the `pseudo_labels` method, saved as `rdir/student.pt` (model only,
    a `vessa predict` checkpoint, the round's key inside). Returns the trainer's summary."""
    import torch

    from student_trainer.checkpoint import atomic_save, load_checkpoint
    from student_trainer.train import Trainer

    torch.manual_seed(job.loop.seed + r)
    cfg = train_settings(job, rdir / "train", r, progress)
    trainer = Trainer(cfg, pseudo=pseudo)
    if init is not None and init.is_file():
        trainer.model.load_state_dict(load_checkpoint(init, map_location=trainer.device)["model"])
    t0 = time.perf_counter()
    result = trainer.fit()
    ckpt = load_checkpoint(rdir / "train" / "latest.pt", map_location="cpu")
    keep = ("format", "kind", "method", "model", "model_meta", "classes", "config", "step", "phase", "phase_step", "best_dice", "best_step")
    student = {k: ckpt[k] for k in keep if k in ckpt}
    student["loop_key"] = key
    student["loop_round"] = r
    atomic_save(student, rdir / STUDENT_FILE)
    return {
        "steps": int(result["step"]),
        "seconds": round(time.perf_counter() - t0, 2),
        "iterations_per_s": round(float(result["iterations_per_s"]), 3),
        "final_loss": result["train_loss"][-1][2] if result["train_loss"] else None,
    }


def student_prompt(student: Path, device: str):
    """The student's softmax on a case's canonical slices, uint8 p·255 (D, C, 256, 256): the prompt."""
    import torch

    from student_trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from student_trainer.inference import predict_slices, resolve_device

    dev = resolve_device(device)
    model, _, image_size = model_from_checkpoint(load_checkpoint(student, map_location="cpu"), dev)
    lock = threading.Lock()  # cases in flight call it from several threads: one at a time

    def prompt(canon: np.ndarray) -> np.ndarray:
        with lock, torch.no_grad():
            probs = predict_slices(model, canon.astype(np.float32) / 255.0, image_size, dev, return_probs=True, amp=False)
        return np.clip(np.rint(probs.numpy() * 255.0), 0, 255).astype(np.uint8)

    return prompt


def _round_score(rdir: Path, truth: Path) -> dict | None:
    """Dice of a round's labels wherever the dataset has ground truth (`vessa label score`), or None."""
    from services.labeling.scoring import score

    try:
        result = score(rdir, truth)
    except (ValueError, OSError) as exc:
        log.info("round %s not scored: %s", rdir.name, exc)
        return None
    s = result["summary"]
    return {
        "dice": round(100 * float(s["mean"]["dice"]), 2),
        "per_class": {name: round(100 * float(v["dice"]["mean"]), 2) for name, v in s["per_class"].items()},
        "cases": len(result["cases"]),
        "spearman_confidence_dice": result["spearman_confidence_dice"],
    }


class LoopRunner:
    """Works a `JobSpec` with `rounds` > 0 (see the module docstring); the interface of `LabelRunner`
    (`run()`, `summary`: the current labeling pass's), events "round" besides the passes' own."""

    def __init__(
        self,
        job: JobSpec,
        redis_url: str,
        on_event: Event | None = None,
        should_stop=None,
        run_id: str | None = None,
        request_stream: str = BULK_STREAM,
        student_progress: bool = False,
    ):
        if job.out is None:
            raise ValueError("the job has no output directory (JobSpec.out)")
        if job.rounds < 1:
            raise ValueError("a loop job has rounds >= 1")
        self.job = job
        self.redis_url = redis_url
        self.on_event = on_event or (lambda kind, data: None)
        self.should_stop = should_stop or (lambda: False)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.request_stream = request_stream
        self.student_progress = student_progress
        self.summary = JobSummary(self.run_id)
        self.table: list[dict] = []
        self.redone: list[int] = []  # rounds worked on in this run (the others were finished before)
        self.versions: tuple[str, int] = ("", -1)  # the service's model and bank versions (round 0's probe)

    def _key(self, r: int) -> str:
        """What round r depends on: the selection, the loop's settings, the service's versions and the
        round before it (its finish time: a redone round makes every later one stale)."""
        j = self.job
        what = {
            "round": r,
            "data": j.data,
            "cases": j.cases,
            "selection": j.selection,
            "classes": j.classes,
            "probs": j.probs,
            "volume_calls": j.volume_calls,
            "loop": j.loop.key() if r else None,
            "versions": list(self.versions),
            "previous": self.table[r - 1].get("finished_at") if r and len(self.table) >= r else None,
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    async def _pass(self, r: int, prompt=None) -> JobSummary:
        """One labeling pass into OUT/rounds/<r> (resumable per case, as any job)."""
        job = self.job.model_copy(update={"out": str(round_dir(Path(self.job.out), r)), "rounds": 0})
        runner = LabelRunner(
            job,
            self.redis_url,
            self.on_event,
            self.should_stop,
            run_id=f"{self.run_id}-r{r}",
            request_stream=self.request_stream,
            prompt=prompt,
            info={"round": r, "loop_job": str(self.job.out)},
        )
        self.summary = runner.summary
        return await runner.run()

    def _finished(self, r: int) -> dict | None:
        """Round r's row when it was finished before with this key and no failed case, else None."""
        row = read_round(Path(self.job.out), r)
        if row is None or row.get("failed", 1) or row.get("key") != self._key(r):
            return None
        return row

    async def run(self) -> JobSummary:
        j = self.job
        out = Path(j.out)
        out.mkdir(parents=True, exist_ok=True)
        remove_partials(out)
        labeled_cases, labeled_patients = await asyncio.to_thread(labeled_set, Path(j.data), j.loop.labeled)
        t_job = time.perf_counter()
        for r in range(j.rounds + 1):
            rdir = round_dir(out, r)
            self.on_event("round", {"round": r, "rounds": j.rounds, "table": list(self.table)})
            if r == 0:
                # always run: it learns the service's versions (the key), and skips every finished case
                t0 = time.perf_counter()
                summary = await self._pass(0)
                if summary.cancelled:
                    return summary
                self.versions = (summary.model_version, summary.bank_version)
                done = self._finished(0)
                if done is None or summary.labeled or summary.failed:
                    done = await self._close_round(0, rdir, time.perf_counter() - t0, None, None)
                    self.redone.append(0)
                self.table.append(done)
                continue
            done = self._finished(r)
            if done is not None:
                log.info("round %d finished before: not redone", r)
                self.table.append(done)
                continue
            self.redone.append(r)
            key = self._key(r)
            student = rdir / STUDENT_FILE
            train_info = self._student_info(student, key)
            if train_info is None:  # no student of this key: (re)train it; labels of another student go
                for sub in ("labels", "probs", "records"):
                    shutil.rmtree(rdir / sub, ignore_errors=True)
                prev = round_dir(out, r - 1)
                records = {k: v for k, v in read_records(prev).items() if v.status == "ok"}
                pseudo = await asyncio.to_thread(
                    pseudo_slices, prev, records, labeled_cases, labeled_patients, j.loop.min_confidence, j.loop.weighted
                )
                init = round_dir(out, r - 1) / STUDENT_FILE if j.loop.warm_start and r > 1 else None
                train_info = await asyncio.to_thread(train_student, j, pseudo, rdir, r, key, init, self.student_progress)
                train_info.update(
                    {
                        "pseudo_slices": len(pseudo),
                        "pseudo_cases": len(set(pseudo.cases)),
                        "dropped_slices": int(sum(pseudo.dropped.values())),
                        "pseudo_weight_mean": round(float(pseudo.weights.mean()), 4) if len(pseudo) else None,
                    }
                )
                write_atomic(rdir / "train.json", json.dumps(train_info, indent=1).encode())
            if self.should_stop():
                self.summary.cancelled = True
                return self.summary
            prompt = await asyncio.to_thread(student_prompt, student, j.loop.device)
            t0 = time.perf_counter()
            summary = await self._pass(r, prompt)
            if summary.cancelled:
                return summary
            self.table.append(await self._close_round(r, rdir, time.perf_counter() - t0, train_info, str(student.relative_to(out))))
        await asyncio.to_thread(self._publish, out, time.perf_counter() - t_job)
        self.on_event("round", {"round": j.rounds, "rounds": j.rounds, "table": list(self.table)})
        return self.summary

    def _student_info(self, student: Path, key: str) -> dict | None:
        """The training summary of a kept student of this key, or None (none, or another key's)."""
        if not student.is_file():
            return None
        from student_trainer.checkpoint import load_checkpoint

        try:
            if load_checkpoint(student).get("loop_key") != key:
                return None
            return json.loads((student.parent / "train.json").read_text())
        except (OSError, ValueError, RuntimeError):
            return None

    async def _close_round(self, r: int, rdir: Path, label_seconds: float, train_info: dict | None, student: str | None) -> dict:
        """Round r's row of the table (confidence, Dice where ground truth exists), written as round.json."""
        records = read_records(rdir)
        ok = [rec for rec in records.values() if rec.status == "ok"]
        scored = await asyncio.to_thread(_round_score, rdir, Path(self.job.data))
        row = {
            "round": r,
            "key": self._key(r),
            "cases": len(ok),
            "failed": sum(rec.status != "ok" for rec in records.values()),
            "confidence_mean": round(float(np.mean([rec.confidence or 0.0 for rec in ok])), 4) if ok else None,
            "dice": scored["dice"] if scored else None,
            "dice_per_class": scored["per_class"] if scored else None,
            "scored_cases": scored["cases"] if scored else 0,
            "spearman_confidence_dice": scored["spearman_confidence_dice"] if scored else None,
            "student": student,
            "train": train_info,
            "label_seconds": round(label_seconds, 2),
            "model_version": self.versions[0],
            "bank_version": self.versions[1],
            "finished_at": time.time(),
        }
        write_atomic(rdir / ROUND_FILE, json.dumps(row, indent=1).encode())
        return row

    def _publish(self, out: Path, seconds: float) -> None:
        """The last round's labels, probabilities and records at OUT (what ranking, review and score
        read), and the manifest with the per-round table."""
        last = round_dir(out, self.job.rounds)
        records = read_records(last)
        for rec in records.values():
            for rel in (rec.output, rec.probs_output):
                if rec.status == "ok" and rel and (last / rel).is_file():
                    write_atomic(out / rel, (last / rel).read_bytes())
            write_record(out, rec)
        info = {
            "job_id": self.run_id,
            "data": str(self.job.data),
            "selection": self.job.selection if not self.job.cases else "cases",
            "class_ids": self.job.classes,
            "probs": self.job.probs,
            "model_version": self.summary.model_version,
            "bank_version": self.summary.bank_version,
            "rounds": [{k: v for k, v in row.items() if k != "key"} for row in self.table],
            "loop": self.job.loop.model_dump(),
            "labels_from_round": self.job.rounds,
            "rounds_redone": list(self.redone),
            "loop_seconds": round(seconds, 2),
        }
        write_manifest(out, info, read_records(out))
        write_atomic(out / "rounds.json", json.dumps(info["rounds"], indent=1).encode())


def rounds_table(rows: list[dict]) -> str:
    """The per-round table as text (the CLI's report)."""
    classes = sorted({n for row in rows for n in (row.get("dice_per_class") or {})})
    head = f"{'round':>5} {'cases':>5} {'failed':>6} {'conf':>6} {'Dice %':>7} " + " ".join(f"{n[:8]:>8}" for n in classes) + f" {'student steps':>13} {'pseudo slices':>13}"
    lines = [head, "-" * len(head)]
    for row in rows:
        per = row.get("dice_per_class") or {}
        t = row.get("train") or {}
        dice = "-" if row.get("dice") is None else f"{row['dice']:.2f}"
        conf = "-" if row.get("confidence_mean") is None else f"{row['confidence_mean']:.3f}"
        lines.append(
            f"{row['round']:>5} {row['cases']:>5} {row['failed']:>6} {conf:>6} {dice:>7} "
            + " ".join(f"{per[n]:8.2f}" if n in per else f"{'-':>8}" for n in classes)
            + f" {t.get('steps', '-'):>13} {t.get('pseudo_slices', '-'):>13}"
        )
    return "\n".join(lines)

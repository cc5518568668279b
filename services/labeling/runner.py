"""The label runner: every selected case of a dataset through the Redis request stream, resumably.

It is one more client of `vessa:requests`, like a trainer (`AsyncStreamClient`), so the dispatcher
spreads its slices over every assistant replica and a job and a training run share a service.

Overlap: `cases_in_flight` cases are worked on at once, each read (and hashed) in a thread, sent as
requests of `batch_slices` canonical slices, and written in a thread when its answers are in; so
reading and writing volumes happen while other cases' slices are being inferred.

Fairness: the job's requests go to the bulk stream (`vessa:requests:bulk`), which the dispatcher reads
only when the trainers' request stream has nothing waiting, with at most `bulk_max_inflight` calls in
flight over all jobs; and the job never has more than `max_in_flight` requests queued (the client's
backpressure), however large (docs/jobs.md, "Sharing a service").

Resume: before any work, one probe request learns the service's model and bank versions; a case whose
record says ok for the same input hash, model and bank version (and whose label file exists) is
skipped. Outputs are written atomically (services/labeling/outputs.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.labeling.cases import (
    CaseInput,
    depth,
    discover,
    input_sha256,
    read_case,
    read_cine_case,
    select,
)
from services.labeling.outputs import (
    CaseRecord,
    ClassStats,
    FrameStats,
    is_done,
    label_path,
    probs_path,
    read_records,
    remove_partials,
    seg_files,
    seg_path,
    write_atomic,
    write_manifest,
    write_record,
)
from shared.data.nifti import label_to_nifti_bytes, nifti_to_bytes, probs_to_nifti
from shared.data.resize import resize_image, resize_label
from shared.jobs import JobSpec
from shared.wire.canonical import canonical_slices
from shared.wire.messages import BULK_STREAM
from shared.wire.protocol import Limits

log = logging.getLogger("vessa.label")


@dataclass
class JobSummary:
    job_id: str
    cases: int = 0
    labeled: int = 0
    skipped: int = 0
    failed: int = 0
    cancelled: bool = False
    slices: int = 0  # slices inferred in this run
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)
    model_version: str = ""
    bank_version: int = -1
    stored: int = 0  # DICOM-SEGs stored on the PACS (a DICOMweb job with store_seg)

    @property
    def slices_per_s(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0


Event = Callable[[str, dict], None]  # (kind, data): "start", "case", "done" (a loop job adds "round")
Prompt = Callable[[np.ndarray], np.ndarray]  # canonical slices (D, 256, 256) uint8 → student probs (D, C, 256, 256) uint8


def class_stats(labels: np.ndarray, conf: np.ndarray, class_ids: list[int], spacing) -> dict[int, ClassStats]:
    """Per class: confidence over the slices where the class was found (mean and worst), voxels, mL.

    labels (D, H, W) uint8 in the input's grid; conf (D, C) per slice and class, background first."""
    voxel_ml = float(np.prod(spacing)) / 1000.0 if spacing is not None else None
    out = {}
    for k in class_ids:
        mask = labels == k
        present = mask.any(axis=(1, 2))
        voxels = int(mask.sum())
        s = ClassStats(index=k, voxels=voxels, volume_ml=None if voxel_ml is None else round(voxels * voxel_ml, 3))
        if present.any() and k < conf.shape[1]:
            vals = conf[present, k].astype(np.float64)
            vals = np.where(np.isfinite(vals), vals, 0.0)
            idx = np.flatnonzero(present)
            s.confidence_mean = round(float(vals.mean()), 4)
            s.confidence_worst = round(float(vals.min()), 4)
            s.worst_slice = int(idx[int(vals.argmin())])
        out[k] = s
    return out


def case_confidence(stats: dict[int, ClassStats]) -> float:
    """A case's trust: the mean over its classes of their mean confidence (a class never found: 0)."""
    if not stats:
        return 0.0
    return round(float(np.mean([s.confidence_mean or 0.0 for s in stats.values()])), 4)


class LabelRunner:
    """Works one `JobSpec` (its `out` set) through the stream `request_stream` (default the dispatcher's
    low-priority lane); `run_id` names this run in the records and the stream client. `prompt`: a
    student's softmax for a case's canonical slices, sent with them as the assistant's dense prompt
    (a round of the closed loop, services/labeling/loop.py); None: templates only. `info`: more keys
    for the manifest's `job`."""

    def __init__(
        self,
        job: JobSpec,
        redis_url: str,
        on_event: Event | None = None,
        should_stop: Callable[[], bool] | None = None,
        run_id: str | None = None,
        request_stream: str = BULK_STREAM,
        prompt: Prompt | None = None,
        info: dict | None = None,
    ):
        if job.out is None:
            raise ValueError("the job has no output directory (JobSpec.out)")
        self.job = job
        self.redis_url = redis_url
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.request_stream = request_stream
        self.on_event = on_event or (lambda kind, data: None)
        self.should_stop = should_stop or (lambda: False)
        self.summary = JobSummary(self.run_id)
        self.records: dict[str, CaseRecord] = {}
        self.class_names: dict[int, str] = {}
        self._last_manifest = 0.0
        self.client = None  # the stream client while the job runs
        self.prompt = prompt
        self.info = dict(info or {})

    def job_info(self) -> dict:
        j = self.job
        return {
            "job_id": self.run_id,
            "data": str(j.data),
            "dicomweb": j.dicomweb.model_dump() if j.dicomweb is not None else None,
            "selection": j.selection if not j.cases else "cases",
            "class_ids": j.classes,
            "probs": j.probs,
            "temporal_context": j.temporal_context,
            "model_version": self.summary.model_version,
            "bank_version": self.summary.bank_version,
            **self.info,
        }

    async def run(self) -> JobSummary:
        from shared.wire.stream_client import AsyncStreamClient

        j = self.job
        t0 = time.perf_counter()
        out = Path(j.out)
        out.mkdir(parents=True, exist_ok=True)
        remove_partials(out)
        if j.dicomweb is not None:  # a study on a PACS: fetched (WADO-RS) into the job's data folder
            from services.labeling.dicomweb import fetch_study

            src = j.dicomweb
            await asyncio.to_thread(fetch_study, src.url, src.study, Path(j.data), src.series)
        found = discover(Path(j.data))
        # the layout's names; else the job's (e.g. the bank's, from the CLI); else class_<k>
        named = {k: v for k, v in found.class_names.items() if k != 0}
        self.class_names = found.class_names if named or not j.class_names else {0: "background", **j.class_names}
        chosen = select(found, j.cases, j.selection)
        if not chosen:
            raise ValueError(
                f"no cases to label in {j.data}: all {len(found.cases)} have ground truth (use --all or --cases)"
                if found.cases
                else f"no cases in {j.data}"
            )
        self.records = read_records(out)
        client = AsyncStreamClient(
            self.redis_url, f"label-{self.run_id}", max_in_flight=j.max_in_flight, request_stream=self.request_stream
        )
        self.client = client
        await client.start()
        try:
            await self._probe(client)
            depths = await asyncio.to_thread(lambda: {c.case_id: depth(c) for c in chosen})
            self.summary.cases = len(chosen)
            self.on_event("start", {"cases": len(chosen), "slices": sum(depths.values()), "depths": depths})
            queue: asyncio.Queue[CaseInput] = asyncio.Queue()
            for c in chosen:
                queue.put_nowait(c)
            workers = [asyncio.create_task(self._worker(client, queue, depths)) for _ in range(max(1, j.cases_in_flight))]
            await asyncio.gather(*workers)
        finally:
            self.summary.seconds = time.perf_counter() - t0
            await client.close()
            write_manifest(out, self.job_info(), self.records)
        if j.dicomweb is not None and j.dicomweb.store_seg:
            from services.labeling.dicomweb import store

            segs = [out / p for r in self.records.values() if r.status == "ok" for p in seg_files(r)]
            self.summary.stored = await asyncio.to_thread(store, j.dicomweb.url, [p for p in segs if p.is_file()])
        self.on_event("done", {"summary": self.summary})
        return self.summary

    async def _probe(self, client) -> None:
        """One blank slice: the service's model and bank versions (the resume key), and a clear error
        when the service cannot answer at all."""
        rid = await client.submit(np.zeros((1, 256, 256), np.uint8), class_ids=self.job.classes)
        res = await client.result(rid, self.job.timeout_s)
        if res is None:
            raise RuntimeError(
                f"the assistant did not answer within {self.job.timeout_s:.0f} s "
                "(is a dispatcher running on this Redis, with the Serve app up?)"
            )
        if res.status != "ok":
            raise RuntimeError(f"the assistant refused the job: {res.error}")
        self.summary.model_version = res.model_version
        self.summary.bank_version = res.bank_version

    async def _worker(self, client, queue: asyncio.Queue, depths: dict[str, int]) -> None:
        while not queue.empty():
            if self.should_stop():
                self.summary.cancelled = True
                return
            case = queue.get_nowait()
            rec = await self._label_case(client, case)
            if rec is not None:
                self.records[case.case_id] = rec
                self._maybe_manifest()
            self.on_event("case", {"case": case.case_id, "record": rec, "slices": depths.get(case.case_id, 0)})

    def _maybe_manifest(self) -> None:
        now = time.monotonic()
        if now - self._last_manifest > 10.0:
            self._last_manifest = now
            write_manifest(Path(self.job.out), self.job_info(), self.records)

    async def _label_case(self, client, case: CaseInput) -> CaseRecord | None:
        """The case's new record, or None when it was already done (skipped)."""
        j, s = self.job, self.summary
        out = Path(j.out)
        t0 = time.perf_counter()
        try:
            sha = await asyncio.to_thread(input_sha256, case)
        except OSError as exc:
            return self._failed(case, None, f"cannot read {case.path.name}: {exc}", t0)
        dicom = case.kind == "dicom"
        if is_done(self.records.get(case.case_id), out, sha, s.model_version, s.bank_version, j.probs, seg=dicom, temporal_context=j.temporal_context):
            s.skipped += 1
            return None
        if case.kind == "cine":
            return await self._label_cine(client, case, sha, t0)
        try:
            if dicom:  # a series of several temporal positions is a cine
                frames = await asyncio.to_thread(read_cine_case, case)
                if len(frames) > 1:
                    return await self._label_cine(client, case, sha, t0, frames)
                vol = frames[0]
            else:
                vol = await asyncio.to_thread(read_case, case)
        except (ValueError, KeyError, OSError) as exc:
            return self._failed(case, sha, str(exc), t0)
        labels, confs, probs, model_version, bank_version, error = await self._infer(client, vol.image)
        if error is not None:
            return self._failed(case, sha, error, t0)
        lab256 = np.concatenate(labels)
        conf = np.concatenate(confs)
        d, h, w = vol.image.shape
        label = resize_label(lab256, (h, w)).astype(np.uint8)
        n_classes = conf.shape[1]
        class_ids = j.classes or list(range(1, n_classes))
        stats = class_stats(label, conf, class_ids, vol.spacing)
        dest = label_path(out, case.case_id)
        probs_dest = probs_path(out, case.case_id) if j.probs else None
        seg_dest = seg_path(out, case.case_id) if dicom else None
        try:
            if probs_dest is not None:
                # written before the label map: a label file never stands without the probs asked for
                await asyncio.to_thread(self._write_probs, np.concatenate(probs), vol, probs_dest)
            if seg_dest is not None:  # likewise the DICOM-SEG of a DICOM input
                await asyncio.to_thread(self._write_seg, label, vol, class_ids, model_version, bank_version, seg_dest)
            data = await asyncio.to_thread(label_to_nifti_bytes, label, vol)
            await asyncio.to_thread(write_atomic, dest, data)
        except (ValueError, OSError) as exc:
            return self._failed(case, sha, f"cannot write the label map: {exc}", t0)
        return await self._finish_ok(
            s, out, case, sha, dest, stats, conf, model_version, bank_version, t0,
            probs_output=str(probs_dest.relative_to(out)) if probs_dest is not None else None,
            seg_output=str(seg_dest.relative_to(out)) if seg_dest is not None else None,
            slices=d,
            shape=[int(x) for x in vol.image.shape],
            spacing=[float(x) for x in vol.spacing] if vol.spacing is not None else None,
        )  # fmt: skip

    async def _infer(self, client, image: np.ndarray, want_probs: bool | None = None, prompt: np.ndarray | None = None):
        """One volume through the service: (labels, confidences, probs) per request at 256×256, the
        versions that answered, and the first error (None when every request was answered).
        `want_probs`: ask for probabilities (default: the job's `probs`); `prompt`: (D, C, 256, 256)
        the dense prompt to send (default: the student's, `self.prompt`, if any)."""
        j, s = self.job, self.summary
        want_probs = j.probs if want_probs is None else want_probs
        canon = await asyncio.to_thread(canonical_slices, list(image))
        if prompt is None and self.prompt is not None:
            prompt = await asyncio.to_thread(self.prompt, canon)
        rids = []
        if j.volume_calls and len(canon) <= Limits().max_slices:  # a replica's per-call slice limit
            rids.append(await client.submit(canon, probs=prompt, class_ids=j.classes, return_probs=want_probs, volume=True))
        else:
            for i in range(0, len(canon), j.batch_slices):
                part = None if prompt is None else prompt[i : i + j.batch_slices]
                rids.append(
                    await client.submit(canon[i : i + j.batch_slices], probs=part, class_ids=j.classes, return_probs=want_probs)
                )
        labels, confs, probs = [], [], []
        model_version, bank_version = s.model_version, s.bank_version
        error = None
        for rid in rids:
            res = await self._result(client, rid)
            if res is None:
                client.abandon(rid)
                error = error or f"no answer within {j.timeout_s:.0f} s while the service answered nothing else"
                continue
            if res.status != "ok":
                error = error or f"assistant: {res.error}"
                continue
            labels.append(res.labels)
            confs.append(res.confidence)
            if want_probs:
                if res.probs is None:
                    error = error or "the assistant returned no probabilities"
                    continue
                probs.append(res.probs)
            model_version, bank_version = res.model_version, res.bank_version
        return labels, confs, probs, model_version, bank_version, error

    async def _label_cine(self, client, case: CaseInput, sha: str, t0: float, frames: list | None = None) -> CaseRecord:
        """A 4D cine, frame by frame (each frame one volume request, its slices' 3D context within the
        frame) into one 4D label map; the record's `frames` holds each frame's confidence and classes.
        `frames`: already read (a DICOM cine series), else read here. A DICOM cine also gets one
        DICOM-SEG per frame (`seg/<case>_tNN.dcm`, referencing that frame's instances), written
        before the label map."""
        from shared.data.cine import cine_labels_to_nifti

        j, s = self.job, self.summary
        out = Path(j.out)
        if j.probs:
            return self._failed(case, sha, "--probs is not supported for a 4D cine", t0)
        if frames is None:
            try:
                frames = await asyncio.to_thread(read_cine_case, case)
            except (ValueError, KeyError, OSError) as exc:
                return self._failed(case, sha, str(exc), t0)
        frame_labels, frame_stats, all_conf = [], [], []
        model_version, bank_version = s.model_version, s.bank_version
        prompts = [None] * len(frames)
        if j.temporal_context > 0:
            # a first pass for every frame's probabilities; the second pass below is prompted with
            # each frame's blended with its neighbours' in time (the cycle taken as periodic)
            from shared.data.cine import temporal_prompts

            first = []
            for vol in frames:
                _, _, probs, _, _, error = await self._infer(client, vol.image, want_probs=True)
                if error is not None:
                    return self._failed(case, sha, f"frame {vol.meta['frame']} (first pass): {error}", t0)
                first.append(np.concatenate(probs))
            prompts = await asyncio.to_thread(temporal_prompts, first, j.temporal_context)
            del first
        for vol, prompt in zip(frames, prompts):
            labels, confs, _, model_version, bank_version, error = await self._infer(client, vol.image, prompt=prompt)
            if error is not None:
                return self._failed(case, sha, f"frame {vol.meta['frame']}: {error}", t0)
            conf = np.concatenate(confs)
            _, h, w = vol.image.shape
            label = resize_label(np.concatenate(labels), (h, w)).astype(np.uint8)
            class_ids = j.classes or list(range(1, conf.shape[1]))
            stats = class_stats(label, conf, class_ids, vol.spacing)
            frame_labels.append(label)
            all_conf.append(conf)
            frame_stats.append(
                FrameStats(
                    frame=int(vol.meta["frame"]),
                    confidence=case_confidence(stats),
                    classes={self.class_names.get(k, f"class_{k}"): v for k, v in stats.items()},
                )
            )
        conf = np.concatenate(all_conf)
        stats = class_stats(np.concatenate(frame_labels), conf, class_ids, frames[0].spacing)
        dest = label_path(out, case.case_id)
        try:
            if case.kind == "dicom":
                for vol, label, fs in zip(frames, frame_labels, frame_stats):
                    seg_dest = seg_path(out, f"{case.case_id}_t{fs.frame:02d}")
                    await asyncio.to_thread(self._write_seg, label, vol, class_ids, model_version, bank_version, seg_dest)
                    fs.seg_output = str(seg_dest.relative_to(out))
            img = await asyncio.to_thread(cine_labels_to_nifti, frame_labels, frames)
            await asyncio.to_thread(write_atomic, dest, nifti_to_bytes(img))
        except (ValueError, OSError) as exc:
            return self._failed(case, sha, f"cannot write the label map: {exc}", t0)
        d = frames[0].image.shape[0]
        return await self._finish_ok(
            s, out, case, sha, dest, stats, conf, model_version, bank_version, t0,
            slices=d * len(frames),
            shape=[len(frames), *(int(x) for x in frames[0].image.shape)],
            spacing=[float(x) for x in frames[0].spacing] if frames[0].spacing is not None else None,
            frames=frame_stats,
            temporal_context=j.temporal_context,
        )  # fmt: skip

    async def _result(self, client, rid: str):
        """The request's result, waiting as long as the service makes progress on this job: the
        timeout is `request_timeout_s` without any answer, not per request, since a request waits
        behind every request of the job queued before it (a slow CPU replica under a deep queue)."""
        while True:
            answered = client.stats["answered"] + client.stats["errors"]
            res = await client.result(rid, self.job.timeout_s)
            if res is not None or client.stats["answered"] + client.stats["errors"] == answered:
                return res
            log.info("request %s still queued behind answered ones; waiting on", rid)

    def _write_seg(self, label: np.ndarray, vol, class_ids: list[int], model_version: str, bank_version: int, dest: Path) -> None:
        from shared.data.dicom_seg import Algorithm, build_seg, seg_bytes

        try:
            seg = build_seg(label, vol, self.class_names, class_ids, Algorithm(model_version, bank_version))
            data = seg_bytes(seg)
        except Exception as exc:  # highdicom's checks raise several types; the case fails, named
            raise ValueError(f"DICOM-SEG: {exc}") from exc
        write_atomic(dest, data)

    @staticmethod
    def _write_probs(probs256: np.ndarray, vol, dest: Path) -> None:
        """(D, C, 256, 256) uint8 → bilinear to the input's grid → 4D uint8 NIfTI, atomically."""
        d, h, w = vol.image.shape
        full = probs256
        if probs256.shape[-2:] != (h, w):
            full = np.empty(probs256.shape[:2] + (h, w), np.uint8)
            for z in range(d):  # slice by slice: a float copy of a whole CT volume's classes is GBs
                full[z] = np.clip(np.rint(resize_image(probs256[z], (h, w))), 0, 255)
        write_atomic(dest, nifti_to_bytes(probs_to_nifti(full, vol)))

    async def _finish_ok(
        self, s: JobSummary, out: Path, case: CaseInput, sha: str, dest: Path, stats: dict, conf, model_version, bank_version,
        t0: float, **fields,
    ) -> CaseRecord:
        """The record of a labeled case (3D or cine: `fields` hold what differs), written and counted."""
        rec = CaseRecord(
            case_id=case.case_id,
            status="ok",
            input=str(case.path),
            input_sha256=sha,
            output=str(dest.relative_to(out)),
            classes={self.class_names.get(k, f"class_{k}"): v for k, v in stats.items()},
            confidence=case_confidence(stats),
            slice_confidence=[[round(float(v), 4) if np.isfinite(v) else None for v in row] for row in conf],
            model_version=model_version,
            bank_version=bank_version,
            seconds=round(time.perf_counter() - t0, 3),
            run_id=self.run_id,
            finished_at=time.time(),
            **fields,
        )
        await asyncio.to_thread(write_record, out, rec)
        s.labeled += 1
        s.slices += rec.slices
        return rec

    def _failed(self, case: CaseInput, sha: str | None, error: str, t0: float) -> CaseRecord:
        log.warning("case %s failed: %s", case.case_id, error)
        self.summary.failed += 1
        self.summary.errors[case.case_id] = error
        rec = CaseRecord(
            case_id=case.case_id,
            status="failed",
            error=error,
            input=str(case.path),
            input_sha256=sha,
            seconds=round(time.perf_counter() - t0, 3),
            run_id=self.run_id,
            finished_at=time.time(),
        )
        write_record(Path(self.job.out), rec)
        return rec


def make_runner(job: JobSpec, redis_url: str, on_event: Event | None = None, should_stop=None, run_id: str | None = None, student_progress: bool = False):
    """The job's runner: a `LabelRunner`, or for `rounds` > 0 the closed loop (`LoopRunner`), which has
    the same interface (`run()`, `summary`); `student_progress`: the loop's students show the trainer's
    progress bar (on a terminal)."""
    if job.rounds > 0:
        from services.labeling.loop import LoopRunner

        return LoopRunner(job, redis_url, on_event, should_stop, run_id=run_id, student_progress=student_progress)
    return LabelRunner(job, redis_url, on_event, should_stop, run_id=run_id)


def run_label_job(job: JobSpec, redis_url: str, on_event: Event | None = None, should_stop=None, student_progress: bool = False) -> JobSummary:
    return asyncio.run(make_runner(job, redis_url, on_event, should_stop, student_progress=student_progress).run())

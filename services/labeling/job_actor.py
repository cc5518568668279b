"""The job runner of the service: a Ray actor per job, placed by Ray wherever there is room, never
work inside the HTTP ingress.

`launch(job_id, redis_url)` starts (or finds) the detached actor `vessa-label-<id>`. The actor reads
the job's spec from Redis, runs `LabelRunner` in a thread and writes the job's state back after every
case. It is restarted by Ray if its process dies (`max_restarts=-1`); a restarted runner resumes from
the records on disk, so no finished case is labeled again. It polls the job's cancel key and stops
starting new cases once it is set (finished outputs stay). When the job ends, the actor ends itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import ray
import redis

from shared.jobs import FINAL, cancel_requested, load_job, save_job

log = logging.getLogger("vessa.label.job")
NAMESPACE = "vessa-jobs"


def actor_name(job_id: str) -> str:
    return f"vessa-label-{job_id}"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LabelJobActor:
    def __init__(self, job_id: str, redis_url: str):
        self.job_id = job_id
        self.redis_url = redis_url
        self._thread = threading.Thread(target=self._work, name=f"label-{job_id}", daemon=True)
        self._thread.start()

    def ping(self) -> str:
        return "running" if self._thread.is_alive() else "finished"

    def pid(self) -> int:
        return os.getpid()

    def _work(self) -> None:
        r = redis.Redis.from_url(self.redis_url, socket_timeout=10)
        try:
            self._run(r)
        finally:
            r.close()
            # the job is over (or was already): leave, without a restart
            try:
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            except Exception as exc:
                log.warning("job %s: the actor could not end itself: %s", self.job_id, exc)

    def _run(self, r: redis.Redis) -> None:
        from services.labeling.outputs import read_records
        from services.labeling.ranking import ranking
        from services.labeling.runner import make_runner

        job = load_job(r, self.job_id)
        if job is None or job.state in FINAL:
            return
        if cancel_requested(r, self.job_id):
            job.state, job.finished = "cancelled", time.time()
            save_job(r, job)
            return
        spec = job.spec
        job.state, job.runs = "running", job.runs + 1
        job.started = job.started or time.time()
        job.counts.labeled = job.counts.skipped = job.counts.failed = 0
        job.errors = {}
        save_job(r, job)
        t0 = time.perf_counter()
        done_slices = {"n": 0}
        stop = {"flag": False, "checked": 0.0}

        def should_stop() -> bool:
            now = time.monotonic()
            if not stop["flag"] and now - stop["checked"] > 0.5:
                stop["checked"] = now
                stop["flag"] = cancel_requested(r, self.job_id)
            return stop["flag"]

        def on_event(kind: str, data: dict) -> None:
            if kind == "round":  # a loop job: the round begun, and the finished rounds' table
                job.round = data["round"]
                job.rounds = data["table"]
            elif kind == "start":
                done_slices["n"] = 0  # each pass of a loop job starts its own counts
                job.counts.labeled = job.counts.skipped = job.counts.failed = 0
                job.errors = {}
                job.counts.cases = data["cases"]
                job.slices_total = data["slices"]
            elif kind == "case":
                rec = data["record"]
                done_slices["n"] += data["slices"]
                if rec is None:
                    job.counts.skipped += 1
                elif rec.status == "ok":
                    job.counts.labeled += 1
                else:
                    job.counts.failed += 1
                    job.errors[data["case"]] = rec.error or "failed"
                job.slices_done = done_slices["n"]
                job.slices_per_s = round(runner.summary.slices / max(time.perf_counter() - t0, 1e-6), 3)
            job.model_version = runner.summary.model_version
            job.bank_version = runner.summary.bank_version
            save_job(r, job)

        runner = make_runner(spec, self.redis_url, on_event, should_stop, run_id=f"{self.job_id}-{job.runs}")
        try:
            summary = asyncio.run(runner.run())
            job.state = "cancelled" if summary.cancelled else "done"
        except Exception as exc:  # the job cannot go on (no cases, service unreachable, …)
            log.exception("job %s failed", self.job_id)
            job.state, job.error = "failed", str(exc) or type(exc).__name__
        job.finished = time.time()
        try:
            job.ranking = ranking(read_records(Path(spec.out)))
        except Exception as exc:
            log.warning("job %s: no ranking: %s", self.job_id, exc)
        save_job(r, job)


def launch(job_id: str, redis_url: str) -> None:
    """Start the job's runner actor (or leave the running one alone)."""
    LabelJobActor.options(
        name=actor_name(job_id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(job_id, redis_url)

"""An `AssistantLink` to an assistant in the trainer's own process (a worker thread, same device).

For GPU runs where Ray Serve and Redis do not fit (the device machine's carry limit), for benchmarks of
the trainer with the assistant sharing its card, and for laptops. Same contract as the Redis link:
`submit` returns at once; a worker thread batches everything queued into one `Assistant.predict`;
`result` waits at most `timeout` and returns None when late. Slices go in canonical uint8 form, so the
assistant's embedding cache is keyed exactly as on the Redis path.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from shared.wire.canonical import to_uint8
from student_trainer.assistant_link import PseudoLabelRequest, PseudoLabelResult

log = logging.getLogger("vessa.inprocess_link")


@dataclass
class _Job:
    rid: str
    images: np.ndarray  # (B, H, W) uint8
    probs: np.ndarray | None  # (B, C, H, W) float32
    done: threading.Event = field(default_factory=threading.Event)
    result: PseudoLabelResult | None = None
    t0: float = field(default_factory=time.perf_counter)


class InProcessAssistantLink:
    def __init__(
        self,
        ckpt: str = "pretrained",
        bank: str = "",
        device: str | None = None,
        encoder: str = "litemedsam",
        class_ids: list[int] | None = None,
        max_batch_slices: int = 256,
        cache_store: str | None = None,
        assistant=None,
    ):
        if assistant is None:
            from assistant_server.assistant import Assistant

            # cache_store: encoder embeddings persisted by `vessa assistant embed` (CPU runs skip the encoder)
            assistant = Assistant.from_files(
                ckpt, bank, device=device, encoder=encoder, cache_device_entries=100_000, cache_store=cache_store
            )
        self.assistant = assistant
        self.class_ids = class_ids
        self.max_batch_slices = max_batch_slices
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._jobs: dict[str, _Job] = {}
        self._counts = {"submitted": 0, "answered": 0, "late": 0, "failed": 0, "batches": 0}
        self._latency = 0.0
        self._worker = threading.Thread(target=self._run, name="vessa-inprocess-assistant", daemon=True)
        self._worker.start()

    def submit(self, request: PseudoLabelRequest) -> str:
        rid = uuid.uuid4().hex
        probs = None if request.student_probs is None else np.asarray(request.student_probs, np.float32)
        job = _Job(rid, to_uint8(request.images), probs)
        self._jobs[rid] = job
        self._queue.put(job)
        self._counts["submitted"] += 1
        return rid

    def _run(self) -> None:
        from assistant_server.assistant import SliceInput

        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            size = len(job.images)
            while size < self.max_batch_slices:  # take whatever else is queued: one predict for all
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
                size += len(nxt.images)
            slices = [
                SliceInput(image=j.images[i], student_probs=None if j.probs is None else j.probs[i])
                for j in batch
                for i in range(len(j.images))
            ]
            try:
                outs = self.assistant.predict(slices, self.class_ids)
                self._counts["batches"] += 1
            except Exception:
                log.exception("in-process assistant failed")
                outs = None
            pos = 0
            for j in batch:
                n = len(j.images)
                if outs is not None:
                    mine = outs[pos : pos + n]
                    j.result = PseudoLabelResult(
                        labels=np.stack([o.label for o in mine]),
                        confidence=np.nan_to_num(np.stack([o.confidence for o in mine]), nan=0.0),
                        model_version=self.assistant.model_version,
                        bank_version=self.assistant.bank.version,
                    )
                pos += n
                j.done.set()

    def result(self, request_id: str, timeout: float) -> PseudoLabelResult | None:
        job = self._jobs.get(request_id)
        if job is None:
            return None
        if not job.done.wait(timeout):
            self._counts["late"] += 1
            self._jobs.pop(request_id, None)
            return None
        self._jobs.pop(request_id, None)
        if job.result is None:
            self._counts["failed"] += 1
            return None
        self._counts["answered"] += 1
        self._latency += time.perf_counter() - job.t0
        return job.result

    def stats(self) -> dict:
        s = dict(self._counts)
        s["fallbacks"] = s["late"] + s["failed"]
        s["mean_latency_s"] = self._latency / s["answered"] if s["answered"] else 0.0
        s["assistant"] = self.assistant.stats()
        return s

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(30)

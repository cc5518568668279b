"""The trainer's side of the Redis path: `StreamAssistantLink`, an `AssistantLink` over
`shared.wire.stream_client.AsyncStreamClient` for the (synchronous) trainer. A background thread runs
the event loop; `submit` never blocks on the assistant; `result` returns None when the answer is late or
failed, and the trainer falls back to its teacher.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future

import numpy as np

from shared.wire.canonical import to_uint8
from shared.wire.messages import new_request_id
from shared.wire.stream_client import AsyncStreamClient
from student_trainer.assistant_link import PseudoLabelRequest, PseudoLabelResult

log = logging.getLogger("vessa.stream_link")


class StreamAssistantLink:
    """`AssistantLink` over the Redis path, for the synchronous trainer."""

    def __init__(
        self,
        redis_url: str,
        trainer_id: str,
        max_in_flight: int = 8,
        class_ids: list[int] | None = None,
        **kwargs,
    ):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vessa-stream-link", daemon=True)
        self._thread.start()
        self.class_ids = class_ids
        self.client: AsyncStreamClient = self._run(
            self._make(redis_url, trainer_id, max_in_flight, kwargs)
        ).result()
        self._futures: dict[str, Future] = {}
        self._counts = {"submitted": 0, "answered": 0, "late": 0, "failed": 0}
        self._latency = 0.0

    async def _make(self, url, trainer_id, k, kwargs) -> AsyncStreamClient:
        client = AsyncStreamClient(url, trainer_id, k, **kwargs)
        await client.start()
        return client

    def _run(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def submit(self, request: PseudoLabelRequest) -> str:
        images = to_uint8(request.images)
        probs = None
        if request.student_probs is not None:
            probs = np.round(np.clip(request.student_probs, 0, 1) * 255).astype(np.uint8)
        rid = new_request_id()
        self._futures[rid] = self._run(self.client.submit(images, probs, self.class_ids, request_id=rid))
        self._counts["submitted"] += 1
        return rid

    def result(self, request_id: str, timeout: float) -> PseudoLabelResult | None:
        t_end = time.monotonic() + timeout
        fut = self._futures.pop(request_id, None)
        if fut is None:
            return None
        try:
            fut.result(timeout=max(0.0, t_end - time.monotonic()))  # the submit itself
            res = self._run(self.client.result(request_id, max(0.0, t_end - time.monotonic()))).result(
                timeout + 5
            )
        except Exception as exc:  # Redis down, queue full, timeout: the caller falls back
            log.warning("assistant request %s failed: %s", request_id, exc)
            self._counts["failed"] += 1
            self._loop.call_soon_threadsafe(self.client.abandon, request_id)
            return None
        if res is None:
            self._counts["late"] += 1
            self._loop.call_soon_threadsafe(self.client.abandon, request_id)
            return None
        if res.status != "ok":
            self._counts["failed"] += 1
            return None
        self._counts["answered"] += 1
        self._latency += res.latency_s
        return PseudoLabelResult(
            labels=res.labels,
            confidence=np.nan_to_num(res.confidence, nan=0.0),
            model_version=res.model_version,
            bank_version=res.bank_version,
        )

    def stats(self) -> dict:
        s = dict(self._counts)
        s["fallbacks"] = s["late"] + s["failed"]
        s["mean_latency_s"] = self._latency / s["answered"] if s["answered"] else 0.0
        s.update({f"client_{k}": v for k, v in self.client.stats.items()})
        return s

    def close(self) -> None:
        try:
            self._run(self.client.close()).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

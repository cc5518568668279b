"""The dispatcher's two lanes, on a real redis-server: a labeling job's bulk stream never makes a
trainer's requests wait behind it, and never has more than `bulk_max_inflight` calls in flight.

The assistant is a stand-in that takes a fixed time per call (this tests the dispatcher's scheduling,
not the model); everything else (Redis, streams, consumer group, Lua finish) is real."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import redis

from services.dispatch.dispatcher import Dispatcher, DispatcherSettings
from shared.wire.messages import (
    BULK_STREAM,
    REQUEST_STREAM,
    RequestEnvelope,
    new_request_id,
    parse_result,
    request_fields,
    result_stream,
)
from shared.wire.protocol import AssistReply, dumps, encode_call


def _request(r: redis.Redis, stream: str, trainer: str, slices: int = 1) -> str:
    """A request of `slices` blank slices on `stream` (job requests here have 2, so the stand-in can
    tell the lanes apart by their blob count)."""
    call, blobs = encode_call([np.zeros((256, 256), np.uint8)] * slices, class_ids=[1])
    rid = new_request_id()
    env = RequestEnvelope(
        request_id=rid, trainer_id=trainer, reply_stream=result_stream(trainer), call=call, n_blobs=len(blobs)
    )
    r.xadd(stream, request_fields(env, blobs))
    return rid


class _SlowAssistant:
    """Answers every call after `seconds`; records which lane each call came from and when."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.log: list[tuple[float, str, str]] = []  # (time, "start"|"end", trainer)
        self.bulk_now = 0
        self.bulk_peak = 0

    async def __call__(self, meta: bytes, blobs: list[bytes]) -> tuple[bytes, list[bytes]]:
        # The call's meta holds no trainer id; the blob count tells the lanes apart in this test.
        lane = "bulk" if len(blobs) == 2 else "main"
        self.log.append((time.monotonic(), "start", lane))
        if lane == "bulk":
            self.bulk_now += 1
            self.bulk_peak = max(self.bulk_peak, self.bulk_now)
        await asyncio.sleep(self.seconds)
        if lane == "bulk":
            self.bulk_now -= 1
        self.log.append((time.monotonic(), "end", lane))
        return dumps(AssistReply()), []


def _bulk_request(r: redis.Redis, trainer: str) -> str:
    return _request(r, BULK_STREAM, trainer, slices=2)


def _answered(r: redis.Redis, trainer: str) -> list[str]:
    return [parse_result(f)[0].request_id for _, f in r.xrange(result_stream(trainer))]


def test_trainer_requests_overtake_a_queued_job_and_the_bulk_lane_stays_bounded(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    assistant = _SlowAssistant(0.3)
    settings = DispatcherSettings(
        redis_url=redis_server.url, consumer="lanes", max_inflight=8, bulk_max_inflight=2, claim_interval_s=0.5
    )
    job_ids = [_bulk_request(r, "label-job") for _ in range(12)]  # a job queued 12 requests

    async def scenario() -> float:
        d = Dispatcher(settings, assistant)
        task = asyncio.create_task(d.run())
        while sum(1 for _, kind, lane in assistant.log if kind == "end" and lane == "bulk") < 2:
            await asyncio.sleep(0.02)
        t_trainer = time.monotonic()
        trainer_ids = [_request(r, REQUEST_STREAM, "trainer") for _ in range(3)]
        while len(_answered(r, "trainer")) < 3 or len(_answered(r, "label-job")) < 12:
            await asyncio.sleep(0.05)
        d.stop()
        await task
        assert sorted(_answered(r, "trainer")) == sorted(trainer_ids)
        return t_trainer

    t_trainer = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert sorted(_answered(r, "label-job")) == sorted(job_ids), "every job request answered exactly once"
    assert assistant.bulk_peak <= 2, f"{assistant.bulk_peak} bulk calls at once, bound 2"
    # All three trainer requests start before the job's next bulk calls do: they waited for a free slot
    # of the dispatcher (there were 6), not behind the 10 job requests still queued.
    main_starts = [t for t, kind, lane in assistant.log if kind == "start" and lane == "main"]
    bulk_starts_after = [t for t, kind, lane in assistant.log if kind == "start" and lane == "bulk" and t > t_trainer]
    assert len(main_starts) == 3
    overtaken_by = [t for t in bulk_starts_after if t < max(main_starts)]
    assert len(overtaken_by) <= 2, f"{len(overtaken_by)} job calls started before the trainer's last one"
    assert len(bulk_starts_after) >= 8, "the job went on once the trainer's requests were in"
    # the job's lane is drained and trimmed like the request stream
    assert r.xinfo_groups(BULK_STREAM)[0]["pending"] == 0


def test_an_idle_trainer_lane_leaves_the_job_its_bounded_share(redis_server):
    """With no trainer traffic the job flows at `bulk_max_inflight` calls at once (not one by one)."""
    r = redis.Redis.from_url(redis_server.url)
    assistant = _SlowAssistant(0.2)
    settings = DispatcherSettings(redis_url=redis_server.url, consumer="lanes", max_inflight=8, bulk_max_inflight=3)

    async def scenario() -> None:
        d = Dispatcher(settings, assistant)
        task = asyncio.create_task(d.run())
        await asyncio.sleep(0.3)  # the dispatcher blocks on both empty lanes; a job arrives
        for _ in range(9):
            _bulk_request(r, "label-job")
        while len(_answered(r, "label-job")) < 9:
            await asyncio.sleep(0.05)
        d.stop()
        await task

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert assistant.bulk_peak == 3, f"peak {assistant.bulk_peak} bulk calls at once, bound 3"


class _OneAtATimeReplica:
    """A single replica that answers one call at a time, `per_slice` seconds per slice (a CPU replica
    under whole-volume requests): a call's latency includes the calls queued before it."""

    def __init__(self, per_slice: float):
        self.per_slice = per_slice
        self.lock = asyncio.Lock()
        self.calls = 0

    async def __call__(self, meta: bytes, blobs: list[bytes]) -> tuple[bytes, list[bytes]]:
        self.calls += 1
        async with self.lock:
            await asyncio.sleep(self.per_slice * len(blobs))
        return dumps(AssistReply()), []


def test_calls_queued_behind_whole_volumes_are_not_timed_out_as_dead(redis_server):
    """Four 3-slice volumes at once on a replica taking 0.3 s a slice: the last answers after ~3.6 s,
    far past the 1 s base timeout. The timeout grows with the slices in flight, so none is retried."""
    r = redis.Redis.from_url(redis_server.url)
    replica = _OneAtATimeReplica(0.3)
    settings = DispatcherSettings(
        redis_url=redis_server.url,
        consumer="slow",
        max_inflight=8,
        bulk_max_inflight=4,
        call_timeout_s=1.0,
        call_timeout_per_slice_s=0.4,
        claim_interval_s=0.5,
    )
    ids = [_request(r, BULK_STREAM, "label-job", slices=3) for _ in range(4)]

    async def scenario() -> Dispatcher:
        d = Dispatcher(settings, replica)
        task = asyncio.create_task(d.run())
        while len(_answered(r, "label-job")) < 4:
            await asyncio.sleep(0.05)
        d.stop()
        await task
        return d

    d = asyncio.run(asyncio.wait_for(scenario(), 60))
    results = [parse_result(f)[0] for _, f in r.xrange(result_stream("label-job"))]
    assert sorted(x.request_id for x in results) == sorted(ids)
    assert all(x.status == "ok" and x.attempts == 1 for x in results), [(x.status, x.attempts, x.error) for x in results]
    assert replica.calls == 4 and d.counters["retries"] == 0
    # the bound itself: 1 s + 0.4 s for each of the 12 slices at the replica
    assert d.call_timeout(12) == 1.0 + 0.4 * 12

"""The Redis path end to end: real redis-server, real dispatcher processes, the real local Serve app."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import redis

from shared.data import open_dataset
from shared.wire.canonical import canonical_slices
from shared.wire.messages import (
    DEAD_LETTER_STREAM,
    REQUEST_STREAM,
    RequestEnvelope,
    new_request_id,
    request_fields,
    result_stream,
)
from shared.wire.protocol import encode_call
from shared.wire.stream_client import AsyncStreamClient
from tests.helpers import start_dispatcher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slices(synth_dir) -> np.ndarray:
    """Canonical (256×256 uint8) unlabeled slices of the synthetic dataset."""
    ds = open_dataset(synth_dir)
    refs = ds.slice_refs()[:24]
    return canonical_slices([ds.read_unlabeled(r).image for r in refs])


@pytest.fixture
def anyio_backend():
    return "asyncio"


def run(coro):
    return asyncio.run(coro)


async def _drive(
    url: str, trainer: str, batches: list[np.ndarray], collect: dict, k: int = 8, **kw
) -> AsyncStreamClient:
    """Submit every batch (at most k in flight) and collect each result by request id."""
    client = AsyncStreamClient(url, trainer, max_in_flight=k, **kw)
    await client.start()
    ids = []
    results = []

    async def reader():
        async for res in client.results():
            results.append(res)
            if len(results) == len(batches):
                return

    task = asyncio.create_task(reader())
    for b in batches:
        ids.append(await client.submit(b, class_ids=[3]))
    await asyncio.wait_for(task, 300)
    collect[trainer] = (ids, results)
    await client.close()
    return client


def _assert_exactly_once(ids, results):
    got = [r.request_id for r in results]
    assert sorted(got) == sorted(ids), "every request answered"
    assert len(got) == len(set(got)), "none answered twice"
    assert all(r.status == "ok" for r in results), [r.error for r in results if r.status != "ok"][:3]


def test_two_trainers_200_requests_exactly_once(serve_app, redis_server, tmp_path, slices):
    disp = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "dispatcher.log")
    # 100 per trainer: the count the streaming issue names (200 from two trainers, exactly once). With
    # up to 8 in flight per trainer both trainers' requests interleave on the one request stream and
    # dispatcher, and 200 draws from 24 slices repeat slices (hash-only requests) within and across them.
    n = 100
    try:
        collect: dict = {}
        rng = np.random.default_rng(0)
        batches = {
            t: [slices[rng.integers(len(slices), size=1)] for _ in range(n)]
            for t in ("trainer-a", "trainer-b")
        }

        async def both():
            await asyncio.gather(*[_drive(redis_server.url, t, b, collect) for t, b in batches.items()])

        run(both())
        for t in batches:
            ids, results = collect[t]
            _assert_exactly_once(ids, results)
            assert all(r.labels.shape == (1, 256, 256) for r in results)
        # results went to each trainer's own stream, nowhere else
        r = redis.Redis.from_url(redis_server.url)
        assert r.xlen(result_stream("trainer-a")) >= n and r.xlen(result_stream("trainer-b")) >= n
        assert r.xlen(DEAD_LETTER_STREAM) == 0
    finally:
        disp.terminate()
        disp.wait(30)


def test_dispatcher_killed_mid_stream_loses_and_duplicates_nothing(serve_app, redis_server, tmp_path, slices):
    env = {"claim_idle_ms": 1500, "claim_interval_s": 0.5}
    first = start_dispatcher(
        redis_server.url, serve_app.gcs_address, tmp_path / "d1.log", consumer="first", **env
    )
    collect: dict = {}
    # 30 requests, up to 16 in flight: the kill after 10 answers still leaves requests the first
    # dispatcher read but never answered (the second must claim them) and requests not yet sent (the
    # second reads them fresh).
    batches = [slices[i % len(slices)][None] for i in range(30)]

    async def scenario():
        task = asyncio.create_task(_drive(redis_server.url, "trainer-k", batches, collect, k=16))
        r = redis.Redis.from_url(redis_server.url)
        # wait until the first dispatcher has answered some, then kill it hard, mid-stream
        while r.xlen(result_stream("trainer-k")) < 10:
            await asyncio.sleep(0.05)
        first.kill()
        first.wait(10)
        second = start_dispatcher(
            redis_server.url, serve_app.gcs_address, tmp_path / "d2.log", consumer="second", **env
        )
        try:
            await task
        finally:
            second.terminate()
            second.wait(30)

    run(scenario())
    ids, results = collect["trainer-k"]
    _assert_exactly_once(ids, results)
    r = redis.Redis.from_url(redis_server.url)
    # exactly one result entry per request on the stream itself, whatever was redelivered
    from shared.wire.messages import parse_result

    entries = r.xrange(result_stream("trainer-k"))
    rids = [parse_result(f)[0].request_id for _, f in entries]
    assert sorted(rids) == sorted(ids)


def test_redis_restart_with_aof_loses_nothing(serve_app, redis_server, tmp_path, slices):
    disp = start_dispatcher(
        redis_server.url, serve_app.gcs_address, tmp_path / "d.log", claim_idle_ms=1500, claim_interval_s=0.5
    )
    collect: dict = {}
    # 24 requests, 8 in flight: the crash after 8 answers leaves requests queued, in flight and not yet
    # sent, all of which must come through the restart.
    batches = [slices[i % len(slices)][None] for i in range(24)]
    try:

        async def scenario():
            task = asyncio.create_task(
                _drive(redis_server.url, "trainer-r", batches, collect, k=8, resend_after_s=8)
            )
            r = redis.Redis.from_url(redis_server.url)
            while r.xlen(result_stream("trainer-r")) < 8:
                await asyncio.sleep(0.05)
            redis_server.stop(kill=True)  # a crash, not a clean shutdown
            await asyncio.sleep(1.0)
            redis_server.start()  # same port, same directory: the AOF is replayed
            await task

        run(scenario())
    finally:
        disp.terminate()
        disp.wait(30)
    ids, results = collect["trainer-r"]
    _assert_exactly_once(ids, results)


def _raw_request(r: redis.Redis, trainer: str, image: np.ndarray, bank_version: int | None = None) -> str:
    call, blobs = encode_call([image], class_ids=[3], bank_version=bank_version)
    rid = new_request_id()
    env = RequestEnvelope(
        request_id=rid, trainer_id=trainer, reply_stream=result_stream(trainer), call=call, n_blobs=len(blobs)
    )
    r.xadd(REQUEST_STREAM, request_fields(env, blobs))
    return rid


def _wait_results(r: redis.Redis, trainer: str, n: int, timeout: float = 120) -> list:
    from shared.wire.messages import parse_result

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = r.xrange(result_stream(trainer))
        if len(entries) >= n:
            return [parse_result(f)[0] for _, f in entries]
        time.sleep(0.1)
    raise AssertionError(f"only {len(r.xrange(result_stream(trainer)))} of {n} results")


def test_malformed_message_is_dead_lettered_and_stream_keeps_flowing(
    serve_app, redis_server, tmp_path, slices
):
    disp = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d.log")
    try:
        r = redis.Redis.from_url(redis_server.url)
        r.xadd(REQUEST_STREAM, {"meta": b"{this is not json"})
        r.xadd(REQUEST_STREAM, {"nothing": b"at all"})
        # a well-formed envelope whose payload lies about its size gets an error result, not a crash
        call, blobs = encode_call([slices[0]], class_ids=[3])
        bad = RequestEnvelope(
            request_id=new_request_id(),
            trainer_id="trainer-m",
            reply_stream=result_stream("trainer-m"),
            call=call,
            n_blobs=1,
        )
        r.xadd(REQUEST_STREAM, request_fields(bad, [blobs[0][:100]]))
        good = [_raw_request(r, "trainer-m", slices[i]) for i in range(3)]
        results = _wait_results(r, "trainer-m", 4)
        by_id = {x.request_id: x for x in results}
        assert all(by_id[g].status == "ok" for g in good)
        assert by_id[bad.request_id].status == "error" and "bytes" in by_id[bad.request_id].error
        deadline = time.monotonic() + 30
        while r.xlen(DEAD_LETTER_STREAM) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        dead = r.xrange(DEAD_LETTER_STREAM)
        assert len(dead) == 2 and all(b"malformed" in f[b"reason"] for _, f in dead)
    finally:
        disp.terminate()
        disp.wait(30)


def test_vanished_bank_version_gets_a_clear_error(serve_app, redis_server, tmp_path, slices):
    disp = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d.log")
    try:
        r = redis.Redis.from_url(redis_server.url)
        rid = _raw_request(r, "trainer-v", slices[0], bank_version=99_999)
        (res,) = _wait_results(r, "trainer-v", 1)
        assert res.request_id == rid and res.status == "error"
        assert "bank version 99999" in res.error and "does not exist" in res.error
    finally:
        disp.terminate()
        disp.wait(30)


def test_cache_hits_travel_by_hash_and_misses_are_resent(serve_app, redis_server, tmp_path, slices):
    disp = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d.log")
    collect: dict = {}
    try:
        # the same slices twice: the second pass sends hashes only
        batch = slices[:4]
        client = run(_drive(redis_server.url, "trainer-h", [batch, batch[::-1].copy()], collect, k=1))
        assert client.stats["hash_only_slices"] >= 4
        ids, results = collect["trainer-h"]
        _assert_exactly_once(ids, results)
        # a client that claims to know hashes the assistant never saw is answered "miss" and resends
        fresh = (slices[4:6].astype(np.int16) + 1).clip(0, 255).astype(np.uint8)

        async def lying():
            c = AsyncStreamClient(redis_server.url, "trainer-h2", max_in_flight=2)
            await c.start()
            from shared.hashing import slice_hash

            c._known.update(slice_hash(x) for x in fresh)
            rid = await c.submit(fresh, class_ids=[3])
            res = await c.result(rid, 120)
            await c.close()
            return c, res

        c2, res = run(lying())
        assert res is not None and res.status == "ok" and res.resent == 2
        assert c2.stats["resent_slices"] == 2 and res.labels.shape == (2, 256, 256)
    finally:
        disp.terminate()
        disp.wait(30)

"""Faults on the Redis path, with real processes: a replica killed mid-batch, a trainer killed and
replaced, Redis at maxmemory, and the network between the trainer/dispatcher and Redis cut or paused.

(The dispatcher killed and restarted, and Redis killed and restarted with its AOF, are in
tests/integration/test_streams.py.) Each scenario asserts the same contract: every request id is answered exactly
once on its trainer's result stream, and a client completes only the ids it submitted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import redis

from services.runtime.redis_server import EmbeddedRedis
from shared.data import open_dataset
from shared.wire.canonical import canonical_slices
from shared.wire.messages import GROUP, REQUEST_STREAM, parse_result, result_stream
from shared.wire.stream_client import AsyncStreamClient, QueueFullError
from tests.helpers import ROOT, start_dispatcher, stop_process, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def slices(synth_dir) -> np.ndarray:
    ds = open_dataset(synth_dir)
    refs = ds.slice_refs()[:16]
    return canonical_slices([ds.read_unlabeled(r).image for r in refs])


def _stream_ids(url: str, trainer: str) -> list[str]:
    r = redis.Redis.from_url(url)
    return [parse_result(f)[0].request_id for _, f in r.xrange(result_stream(trainer))]


def _assert_answered_once_on_stream(url: str, trainer: str, ids: list[str], exact: bool = True) -> None:
    """Each request id has exactly one result entry on the trainer's stream. exact=False: the stream
    may also hold the client's own resends of cache misses (new ids, each answered once too)."""
    got = _stream_ids(url, trainer)
    assert len(got) == len(set(got)), "a request was answered twice"
    if exact:
        assert sorted(got) == sorted(ids), f"{len(got)} results on the stream for {len(ids)} requests"
    else:
        assert set(ids) <= set(got), f"{len(set(ids) - set(got))} requests without a result on the stream"


async def _collect(client: AsyncStreamClient, n: int, timeout: float) -> list:
    out = []

    async def take():
        async for res in client.results():
            out.append(res)
            if len(out) == n:
                return

    await asyncio.wait_for(take(), timeout)
    return out


# ---------------------------------------------------------------------------------------------- replica killed
def _replica_actors(app: str = "vessa", deployment: str = "VessaAssistant") -> list:
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in named]


def test_replica_killed_mid_batch_requests_answered_once(serve_app, redis_server, tmp_path, slices):
    """ray.kill the VessaAssistant replica while requests are in flight: Serve starts a new one, the
    dispatcher retries the calls that died with it, and each request is answered exactly once."""
    import ray

    log = tmp_path / "d.log"
    disp = start_dispatcher(
        redis_server.url, serve_app.gcs_address, log, max_attempts=6, retry_backoff_s=1.0, call_timeout_s=180
    )
    # 20 requests, 16 in flight: at the kill (after 4 answers) all 16 slots are still taken, so calls are in
    # flight; the rest run on the new replica, whose empty cache makes the client resend hash-only slices.
    n = 20
    try:

        async def scenario():
            client = AsyncStreamClient(redis_server.url, "trainer-rk", max_in_flight=16, resend_after_s=120)
            await client.start()
            collect = asyncio.create_task(_collect(client, n, 300))
            ids = [await client.submit(slices[[i % len(slices), (i + 5) % len(slices)]], class_ids=[3]) for i in range(n)]
            r = redis.Redis.from_url(redis_server.url)
            while r.xlen(result_stream("trainer-rk")) < 4:
                await asyncio.sleep(0.05)
            (victim,) = _replica_actors()
            ray.kill(victim, no_restart=True)  # mid-stream: 16 requests in flight, a batch running
            results = await collect
            await client.close()
            return ids, results, client

        ids, results, client = asyncio.run(scenario())
        got = [x.request_id for x in results]
        assert sorted(got) == sorted(ids) and len(set(got)) == len(got)
        assert all(x.status == "ok" for x in results), [x.error for x in results if x.status != "ok"][:3]
        assert client.stats["answered"] == n and client.stats["errors"] == 0
        # the new replica's embedding cache is empty: hash-only slices come back "miss" and the client
        # resends them under new ids, so the stream holds those answers too
        _assert_answered_once_on_stream(redis_server.url, "trainer-rk", ids, exact=client.stats["resent_slices"] == 0)
        assert "attempt 1 failed" in log.read_text(), "the kill hit no call in flight"
    finally:
        stop_process(disp)
        wait_ready(serve_app.url)  # the shared app must be healthy for the tests after this one
        assert len(_replica_actors()) == 1


# ---------------------------------------------------------------------------------------------- trainer killed
CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    from shared.wire.stream_client import AsyncStreamClient

    async def main(url, out, n):
        client = AsyncStreamClient(url, "trainer-kill", max_in_flight=64)
        await client.start()
        rng = np.random.default_rng(1)
        with open(out, "w") as fh:
            for _ in range(n):
                rid = await client.submit(rng.integers(0, 255, (1, 64, 64), dtype=np.uint8), class_ids=[3])
                fh.write(rid + "\\n")
                fh.flush()
        print("submitted", flush=True)
        await asyncio.sleep(3600)  # waits for answers it will never read: SIGKILL comes first

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


def test_trainer_killed_and_replaced_no_loss_no_double_apply(serve_app, redis_server, tmp_path, slices):
    """A trainer's client process is SIGKILLed with its requests in flight; a new client with the same
    trainer id starts. The dead client's requests are still answered, once each, on the trainer's
    result stream; the new client completes only its own requests and ignores the others' results."""
    ids_file = tmp_path / "ids.txt"
    n_old, n_new = 12, 6
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, redis_server.url, str(ids_file), str(n_old)],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        lines = []
        while not lines or lines[-1].strip() not in (b"submitted", b""):
            lines.append(proc.stdout.readline())
        assert lines[-1].strip() == b"submitted", b"".join(lines).decode(errors="replace")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    old_ids = ids_file.read_text().split()
    assert len(old_ids) == n_old

    async def scenario():
        client = AsyncStreamClient(redis_server.url, "trainer-kill", max_in_flight=8)
        await client.start()
        new_ids = [await client.submit(slices[[i]], class_ids=[3]) for i in range(n_new)]
        # only now does a dispatcher come up: the dead client's answers land after the new client started
        disp = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d.log")
        try:
            results = await _collect(client, n_new, 300)
            deadline = time.monotonic() + 120
            while len(_stream_ids(redis_server.url, "trainer-kill")) < n_old + n_new:
                assert time.monotonic() < deadline, "the dead client's requests were not all answered"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.5)  # let the reader see every entry
        finally:
            stop_process(disp)
        await client.close()
        return new_ids, results, client

    new_ids, results, client = asyncio.run(scenario())
    got = [x.request_id for x in results]
    assert sorted(got) == sorted(new_ids), "the new client completed exactly its own requests"
    assert all(x.status == "ok" for x in results)
    assert client.stats["answered"] == n_new
    assert client.stats["duplicates"] == n_old, "every result of the dead client was seen and ignored"
    assert not (set(client._finished) & set(old_ids))
    _assert_answered_once_on_stream(redis_server.url, "trainer-kill", old_ids + new_ids)


# ---------------------------------------------------------------------------------------------- Redis full
async def _assist_once(images: list[np.ndarray]) -> None:
    """One call of the shared app's assistant as the dispatcher makes it (templates only, all classes)."""
    from services.dispatch.launch import serve_handle_caller
    from shared.wire.protocol import AssistReply, encode_call

    call, blobs = encode_call(images)
    meta, _ = await serve_handle_caller()(call.model_dump_json().encode(), blobs)
    assert AssistReply.model_validate_json(meta).status == "ok"


def test_redis_full_backpressure_nothing_evicted_then_recovers(serve_app, tmp_path):
    """At maxmemory (noeviction) a producer gets QueueFullError and nothing queued is lost; a dispatcher
    (re)started on the full Redis still answers and acknowledges everything, memory is freed, and
    producers can submit again."""
    server = EmbeddedRedis(tmp_path / "redis", maxmemory="4mb").start()
    r = redis.Redis.from_url(server.url)
    r.xgroup_create(REQUEST_STREAM, GROUP, id="0", mkstream=True)  # the group of a dispatcher that ran before
    # Incompressible, so every request really takes 128 KiB of Redis; the same two slices each time, so
    # the assistant encodes them once and the drain is quick.
    noise = np.random.default_rng(0).integers(0, 255, (2, 256, 256), dtype=np.uint8)
    disp = None
    try:
        # Those two slices once through the path the dispatcher takes (a DeploymentHandle call), before
        # Redis fills: the replica then holds their embeddings and answers, so draining the queue below
        # costs no encoder/decoder passes (batches of these requests would otherwise each run the
        # decoder on CPU, ~10 s in all): what is timed is the queue's backpressure, not the model.
        asyncio.run(_assist_once(list(noise)))

        async def fill():
            client = AsyncStreamClient(server.url, "trainer-full", max_in_flight=1000)
            await client.start()
            ids, err = [], None
            for _ in range(200):  # 4 MiB of incompressible 128 KiB requests fills it long before 200
                try:
                    ids.append(await client.submit(noise.copy()))
                except QueueFullError as exc:
                    err = exc
                    break
            # the large-payload path (blob key + MULTI/EXEC) reports the same clear error
            big = AsyncStreamClient(server.url, "trainer-full-big", blob_threshold=1024)
            await big.start()
            with pytest.raises(QueueFullError):
                await big.submit(noise.copy())
            await big.close()
            return client, ids, err

        loop = asyncio.new_event_loop()
        client, ids, err = loop.run_until_complete(fill())
        assert err is not None, "Redis never refused a request"
        assert "maxmemory" in str(err) and "noeviction" in str(err) and "not queued" in str(err)
        assert len(ids) >= 5 and client.in_flight == len(ids), "a refused request holds no slot"
        assert r.xlen(REQUEST_STREAM) == len(ids), "every accepted request is still queued"
        assert r.info("stats")["evicted_keys"] == 0 and r.keys("vessa:blob:*") == []

        disp = start_dispatcher(
            server.url, serve_app.gcs_address, tmp_path / "d.log", trim_interval_s=1, claim_interval_s=0.5
        )

        async def drain():
            results = await _collect(client, len(ids), 300)
            # acknowledged entries are trimmed: room for new requests again
            deadline = time.monotonic() + 60
            while True:
                try:
                    rid = await client.submit(noise.copy())
                    break
                except QueueFullError:
                    assert time.monotonic() < deadline, "memory was never freed"
                    await asyncio.sleep(0.5)
            (res,) = await _collect(client, 1, 120)
            await client.close()
            return results, rid, res

        results, rid, res = loop.run_until_complete(drain())
        loop.close()
        got = [x.request_id for x in results]
        assert sorted(got) == sorted(ids) and all(x.status == "ok" for x in results)
        assert res.request_id == rid and res.status == "ok"
        _assert_answered_once_on_stream(server.url, "trainer-full", ids + [rid])
        assert r.info("stats")["evicted_keys"] == 0
    finally:
        if disp is not None:
            stop_process(disp)
        server.stop()


# ---------------------------------------------------------------------------------------------- network
class FlakyProxy:
    """A TCP proxy on loopback in a thread: `cut(s)` closes every connection and refuses new ones for s
    seconds (a network partition); traffic otherwise flows both ways."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.conns: set[asyncio.StreamWriter] = set()
        self.down_until = 0.0
        self.cuts = 0
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self.down_until:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.conns |= {writer, up_w}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()
                self.conns.discard(dst)

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def cut(self, seconds: float) -> None:
        def _cut():
            self.down_until = time.monotonic() + seconds
            self.cuts += 1
            for w in list(self.conns):
                w.transport.abort()
            self.conns.clear()

        self.loop.call_soon_threadsafe(_cut)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_network_cut_and_redis_paused_clients_reconnect(serve_app, redis_server, tmp_path, slices):
    """Between the trainer/dispatcher and Redis: the connections are cut (and refused) for 3 s, later
    Redis is frozen (SIGSTOP) for 4 s. The client and the dispatcher reconnect with backoff and
    carry on; every request completes exactly once."""
    proxy = FlakyProxy(redis_server.port)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    disp = start_dispatcher(
        url, serve_app.gcs_address, tmp_path / "d.log", claim_idle_ms=3000, claim_interval_s=1.0
    )
    n = 30
    try:

        async def scenario():
            client = AsyncStreamClient(url, "trainer-net", max_in_flight=8, resend_after_s=20)
            await client.start()
            collect = asyncio.create_task(_collect(client, n, 360))
            ids = []

            async def produce():
                for i in range(n):
                    ids.append(await client.submit(slices[[i % len(slices)]], class_ids=[3]))

            producer = asyncio.create_task(produce())
            r = redis.Redis.from_url(redis_server.url)
            while r.xlen(result_stream("trainer-net")) < 5:
                await asyncio.sleep(0.05)
            proxy.cut(3.0)
            while r.xlen(result_stream("trainer-net")) < 15:
                await asyncio.sleep(0.05)
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(4.0)
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            await producer
            results = await collect
            await client.close()
            return ids, results

        ids, results = asyncio.run(scenario())
        got = [x.request_id for x in results]
        assert sorted(got) == sorted(ids) and len(set(got)) == n
        assert all(x.status == "ok" for x in results), [x.error for x in results if x.status != "ok"][:3]
        _assert_answered_once_on_stream(redis_server.url, "trainer-net", ids)
        assert proxy.cuts == 1
        assert disp.poll() is None, "the dispatcher survived the outage"
    finally:
        stop_process(disp)
        proxy.close()

"""The serving path without the model: how much one Redis, one dispatcher, two dispatchers and the REST
ingress can move when the assistant answers instantly.

    python -m benchmarks.path_bench [--messages 1500] [--slices 1 16] [--trainers 2] [--in-flight 64]
                                    [--http-requests 1500] [--concurrency 32] [--json runs/path_bench.json]

One run, side by side (same machine, same moment):
- `Redis alone`: the Redis commands of each message (see `redis_alone`), pipelined from one client.
- `redis + 1 dispatcher, no Ray`: trainers (AsyncStreamClient, as `vessa train` uses) → Redis →
  one dispatcher process whose caller answers in-process at once → Redis → trainers. The ceiling of
  the Redis protocol and of one dispatcher's event loop.
- `1 dispatcher → Serve` / `2 dispatchers → Serve`: the same, with real `vessa dispatcher` processes
  calling a Serve deployment through a DeploymentHandle; the deployment (`InstantAssistant`, 2
  replicas) parses the call and returns a prepared label map per slice (zlib, as real ones travel).
- `ingress`: POST /v1/pseudo-labels with a .npy of S slices through the real VessaIngress (FastAPI on
  Ray Serve) to the same instant deployment, at a fixed concurrency.
Messages carry their images (64 KiB per 256×256 uint8 slice; no hash-only sends), so slices/s counts
bytes as well as messages. Everything shares the machine's cores with the load generators: on a small
machine the figures are a floor, and docs/deploy.md's capacity table says how they scale.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- the stand-in
def _label_blob() -> tuple[dict, bytes]:
    """One realistic label map (a disc of class 3 on background), encoded as the assistant sends it."""
    from shared.wire.arrays import encode_array

    yy, xx = np.mgrid[:256, :256]
    label = (((yy - 128) ** 2 + (xx - 120) ** 2) < 40**2).astype(np.uint8) * 3
    blobs: list[bytes] = []
    spec = encode_array(label, blobs)
    return spec.model_dump(), blobs[0]


def instant_reply(meta: bytes | str, spec: dict, blob: bytes) -> tuple[bytes, list[bytes]]:
    """An 'ok' reply with the prepared label for every slice of the call."""
    from shared.wire.arrays import ArraySpec
    from shared.wire.protocol import AssistReply, WireSliceResult, dumps, parse_call

    call = parse_call(meta)
    results = [
        WireSliceResult(
            status="ok",
            hash=s.hash or "0" * 32,
            confidence=[None, None, None, 0.9],
            label=ArraySpec(**{**spec, "blob": i}),
        )
        for i, s in enumerate(call.slices)
    ]
    reply = AssistReply(slices=results, model_version="instant", bank_version=1)
    return dumps(reply), [blob] * len(results)


def instant_deployment():
    from ray import serve

    @serve.deployment(name="VessaAssistant", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
    class InstantAssistant:
        def __init__(self):
            self.spec, self.blob = _label_blob()

        async def assist(self, meta, blobs):
            return instant_reply(meta, self.spec, self.blob)

        async def templates(self) -> dict:
            names = ["background", "RV", "Myo", "LV"]
            return {"version": 1, "classes": [{"index": i, "name": n, "description": n} for i, n in enumerate(names)], "templates": []}

        async def info(self) -> dict:
            return {"ready": True, "bank_version": 1, "model": "instant"}

    return InstantAssistant


# ---------------------------------------------------------------------------------------------- roles
def run_inprocess_dispatcher(redis_url: str, consumer: str) -> None:
    """`--role dispatcher`: a dispatcher whose caller answers at once, without Ray."""
    from services.dispatch.dispatcher import DispatcherSettings
    from services.dispatch.launch import run_dispatcher

    spec, blob = _label_blob()

    async def call(meta: bytes, blobs: list[bytes]) -> tuple[bytes, list[bytes]]:
        return instant_reply(meta, spec, blob)

    asyncio.run(run_dispatcher(DispatcherSettings(redis_url=redis_url, consumer=consumer), call))


async def drive_stream(redis_url: str, n: int, slices: int, trainers: int, in_flight: int) -> dict:
    """n messages of `slices` slices each, split over `trainers` clients; wall time to the last answer."""
    from shared.wire.stream_client import AsyncStreamClient

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 255, (64, 256, 256), dtype=np.uint8)

    async def one(t: int, count: int) -> int:
        client = AsyncStreamClient(redis_url, f"bench-{t}-{time.monotonic_ns()}", max_in_flight=in_flight, send_hashes=False)
        await client.start()
        got = 0

        async def reader():
            nonlocal got
            async for res in client.results():
                assert res.status == "ok", res.error
                got += 1
                if got == count:
                    return

        task = asyncio.create_task(reader())
        for i in range(count):
            idx = [(i * slices + k) % len(pool) for k in range(slices)]
            await client.submit(pool[idx], class_ids=[3])
        await asyncio.wait_for(task, 600)
        await client.close()
        return got

    per = [n // trainers + (1 if t < n % trainers else 0) for t in range(trainers)]
    t0 = time.perf_counter()
    done = sum(await asyncio.gather(*[one(t, c) for t, c in enumerate(per)]))
    wall = time.perf_counter() - t0
    return {"messages": done, "seconds": wall, "messages_per_s": done / wall, "slices_per_s": done * slices / wall}


def redis_alone(redis_url: str, n: int, slices: int, batch: int = 64) -> dict:
    """Redis by itself: each message's commands as the path issues them (XADD of the request; XREADGROUP;
    the dispatcher's finish script: result XADD, EXPIRE, SET done, XACK; XREAD of the result), from one
    client, pipelined `batch` messages at a time. No Python event loop, no Serve: Redis's own ceiling."""
    import redis

    from services.dispatch.dispatcher import FINISH_LUA
    from shared.wire.messages import GROUP, REQUEST_STREAM

    spec, label = _label_blob()
    image = np.random.default_rng(2).integers(0, 255, (256, 256), dtype=np.uint8).tobytes()
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create(REQUEST_STREAM, GROUP, id="0", mkstream=True)
    finish = r.register_script(FINISH_LUA)
    request = {"meta": b"{}" * 200, **{f"b{i}": image for i in range(slices)}}
    result = ["meta", b"{}" * 200, *[x for i in range(slices) for x in (f"b{i}", label)]]
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        k = min(batch, n - start)
        with r.pipeline(transaction=False) as p:
            for _ in range(k):
                p.xadd(REQUEST_STREAM, request)
            p.execute()
        entries = r.xreadgroup(GROUP, "solo", {REQUEST_STREAM: ">"}, count=k)[0][1]
        with r.pipeline(transaction=False) as p:
            for entry_id, _ in entries:
                rid = entry_id.decode()
                finish(keys=[f"vessa:done:{rid}", "vessa:results:bench", REQUEST_STREAM],
                       args=[GROUP, entry_id, 10_000, 3600, 3600, *result], client=p)
            p.execute()
        r.xread({"vessa:results:bench": "0-0"}, count=k)
        r.xtrim(REQUEST_STREAM, maxlen=0)
        r.xtrim("vessa:results:bench", maxlen=0)
    wall = time.perf_counter() - t0
    return {"messages": n, "seconds": wall, "messages_per_s": n / wall, "slices_per_s": n * slices / wall}


async def drive_http(url: str, n: int, slices: int, concurrency: int) -> dict:
    import httpx

    from shared.wire.arrays import write_npy

    rng = np.random.default_rng(1)
    payload = write_npy(rng.integers(0, 255, (slices, 256, 256), dtype=np.uint8))
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as http:

        async def one():
            async with sem:
                t = time.perf_counter()
                r = await http.post("/v1/pseudo-labels", files={"file": ("x.npy", payload)})
                r.raise_for_status()
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*[one() for _ in range(min(50, n))])  # warm-up: connections, routes
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        wall = time.perf_counter() - t0
    lat.sort()
    return {
        "messages": n,
        "seconds": wall,
        "messages_per_s": n / wall,
        "slices_per_s": n * slices / wall,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)],
    }


def _cpu_s(procs) -> float:
    """User + system CPU seconds of these processes so far (psutil.Process objects)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # gone
            pass
    return total


def _measured(fn, watched: dict, n: int):
    """Run fn(); add each watched group's CPU milliseconds per message to its result: where the cores go."""
    before = {k: _cpu_s(v) for k, v in watched.items()}
    r = fn()
    for k, v in watched.items():
        r[f"cpu_ms_per_message_{k}"] = 1000 * (_cpu_s(v) - before[k]) / max(1, n)
    return r


def _spawn(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=str(ROOT), env={**os.environ, **(env or {})}, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def _reset(redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).flushdb()


def _wait_group_consumers(redis_url: str, n: int, timeout: float = 120) -> None:
    """Until n dispatchers are reading the request stream (a blocked XREADGROUP each: Redis 7.0 lists a
    consumer only after its first delivery, so XINFO CONSUMERS cannot tell)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(c.get("cmd") == "xreadgroup" for c in r.client_list()) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{n} dispatchers did not start reading within {timeout} s")


def run(args) -> dict:
    import ray
    from ray import serve

    from services.ingress.ingress import VessaIngress
    from services.ingress.settings import ApiSettings
    from services.runtime.redis_server import EmbeddedRedis
    from tests.conftest import free_port

    work = Path(tempfile.mkdtemp(prefix="vessa-path-bench-"))
    redis_server = EmbeddedRedis(work / "redis", appendonly=True).start()
    url = redis_server.url
    rows: list[dict] = []
    try:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=os.cpu_count())
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        assistant = instant_deployment().options(num_replicas=args.replicas)
        ingress = VessaIngress.options(num_replicas=1, ray_actor_options={"num_cpus": 0})
        serve.run(ingress.bind(assistant.bind(), ApiSettings(max_upload_mb=64).model_dump(mode="json")), name="vessa", route_prefix="/")
        gcs = ray.get_runtime_context().gcs_address
        from benchmarks.load_test import find_processes

        found = find_processes(None)
        replicas = [p for k, p in found.items() if k.startswith("replica vessa:VessaAssistant")]
        http_side = [p for k, p in found.items() if k == "proxy" or k.startswith("replica vessa:VessaIngress")]
        redis_ps = psutil.Process(redis_server.proc.pid)
        me = psutil.Process()
        for slices in args.slices:
            n = max(args.trainers, args.messages // slices)
            _reset(url)
            r = _measured(lambda n=n, slices=slices: redis_alone(url, n, slices), {"redis": [redis_ps]}, n)
            rows.append({"path": "Redis alone (pipelined, one client)", "slices_per_message": slices, **r})
            # redis + one dispatcher, no Ray
            _reset(url)
            procs = [_spawn([sys.executable, "-m", "benchmarks.path_bench", "--role", "dispatcher", "--redis-url", url, "--consumer", "solo"], work / "solo.log")]
            try:
                _wait_group_consumers(url, 1)
                r = _measured(
                    lambda n=n, slices=slices: asyncio.run(drive_stream(url, n, slices, args.trainers, args.in_flight)),
                    {"redis": [redis_ps], "dispatchers": [psutil.Process(p.pid) for p in procs], "trainers": [me]},
                    n,
                )
            finally:
                _stop(procs)
            rows.append({"path": "Redis + 1 dispatcher, no Ray", "slices_per_message": slices, **r})
            for k in (1, 2):
                _reset(url)
                procs = [
                    _spawn([sys.executable, "-m", "services.cli.main", "dispatcher", "--redis-url", url, "--ray-address", gcs, "--consumer", f"d{i}"], work / f"d{i}.log")
                    for i in range(k)
                ]
                try:
                    _wait_group_consumers(url, k)
                    r = _measured(
                        lambda n=n, slices=slices: asyncio.run(drive_stream(url, n, slices, args.trainers, args.in_flight)),
                        {"redis": [redis_ps], "dispatchers": [psutil.Process(p.pid) for p in procs], "replicas": replicas, "trainers": [me]},
                        n,
                    )
                finally:
                    _stop(procs)
                rows.append({"path": f"{k} dispatcher{'s' if k > 1 else ''} → Serve", "slices_per_message": slices, **r})
            m = max(50, args.http_requests // slices)
            r = _measured(
                lambda m=m, slices=slices: asyncio.run(drive_http(f"http://127.0.0.1:{port}", m, slices, args.concurrency)),
                {"proxy+ingress": http_side, "replicas": replicas, "client": [me]},
                m + min(50, m),  # the warm-up requests are counted in the CPU too
            )
            rows.append({"path": f"ingress (REST, concurrency {args.concurrency})", "slices_per_message": slices, **r})
            print(json.dumps(rows[-5:], indent=1), flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        redis_server.stop()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "command": "python -m benchmarks.path_bench " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("role", "json", "redis_url", "consumer")},
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        "| path | slices / message | messages/s | slices/s | p50 / p99 ms (REST) | CPU ms per message |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in result["rows"]:
        lat = f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}" if "p50_ms" in r else ""
        cpu = ", ".join(
            f"{k.removeprefix('cpu_ms_per_message_')} {v:.1f}" for k, v in r.items() if k.startswith("cpu_ms_per_message_")
        )
        lines.append(
            f"| {r['path']} | {r['slices_per_message']} | {r['messages_per_s']:,.0f} | {r['slices_per_s']:,.0f} | {lat} | {cpu} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=1500, help="slices per stream run: messages = this / slices")
    ap.add_argument("--slices", type=int, nargs="+", default=[1, 16], help="slices per message")
    ap.add_argument("--trainers", type=int, default=2)
    ap.add_argument("--in-flight", type=int, default=64, help="requests in flight per trainer")
    ap.add_argument("--replicas", type=int, default=2, help="instant assistant replicas")
    ap.add_argument("--http-requests", type=int, default=1500, help="slices per REST run: requests = this / slices")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "path_bench.json")
    ap.add_argument("--role", choices=["bench", "dispatcher"], default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    ap.add_argument("--consumer", default="solo", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "dispatcher":
        run_inprocess_dispatcher(args.redis_url, args.consumer)
        return 0
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\n{result['date']}, {result['machine']}\n`{result['command']}`\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving paths side by side, in one run: slices/s and latency, as ratios to the DeploymentHandle path.

    python -m benchmarks.serving [--device cpu] [--mode both|warm|cold] [--requests 64] [--concurrency 8]
                                 [--encoder litemedsam] [--json OUT]

Paths: the assistant in-process (one request at a time, and all at once as one batch: the model alone),
a DeploymentHandle, HTTP with one slice per request, HTTP with a 16-slice NIfTI volume per request (`--volume-slices`),
the handle path without `@serve.batch` batching (max 1 slice per batch: the batching gain), and the
Redis path (stream client → Redis → dispatcher → handle → result stream). Warm: every slice's
embedding is cached before timing (the Stage-2 case: a new prompt on a known slice); cold: every timed
slice is new, so the encoder runs. LiteMedSAM's architecture with its released weights and an untrained
head; speed does not depend on weight values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q)) if xs else float("nan")


def row(name: str, slices: int, wall: float, lat: list[float], requests: int) -> dict:
    return {
        "path": name,
        "requests": requests,
        "slices": slices,
        "seconds": wall,
        "slices_per_s": slices / wall if wall > 0 else float("nan"),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
    }


_STAMP = iter(range(1, 1 << 31))


def make_slices(n: int, seed: int, base: np.ndarray) -> np.ndarray:
    """n never-seen canonical uint8 slices: real synthetic slices, each stamped with a unique serial
    number in three corner pixels (so no two ever share a content hash, and cold stays cold)."""
    rng = np.random.default_rng(seed)
    out = base[rng.integers(0, len(base), n)].copy()
    for i in range(n):
        k = next(_STAMP)
        out[i, 0, :3] = (k & 255, (k >> 8) & 255, (k >> 16) & 255)
    return out


async def run_concurrent(fn, items: list, concurrency: int) -> tuple[float, list[float]]:
    """Run `await fn(item)` for every item with at most `concurrency` at once: (wall s, latencies)."""
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []

    async def one(item):
        async with sem:
            t0 = time.perf_counter()
            await fn(item)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[one(i) for i in items])
    return time.perf_counter() - t0, lat


def setup_data(work: Path, encoder: str, device: str) -> tuple[Path, np.ndarray]:
    from assistant_server.bank_builder import build_bank
    from shared.data import open_dataset
    from shared.data.synth import write_msd_dataset
    from shared.wire.canonical import canonical_slices

    data = work / "synth"
    write_msd_dataset(data, cases=6, seed=0)
    bank = work / "bank"
    build_bank(data, 2, bank, encoder=encoder, device=device)
    ds = open_dataset(data)
    base = canonical_slices([ds.read_unlabeled(r).image for r in ds.slice_refs()])
    return bank, base


async def bench(args) -> list[dict]:
    import httpx
    import ray
    from ray import serve

    from assistant_server.assistant import Assistant, SliceInput
    from services.dispatch.dispatcher import Dispatcher, DispatcherSettings
    from services.dispatch.launch import serve_handle_caller
    from services.ingress.app import all_cores_runtime_env, build_app
    from services.ingress.uploads import nifti_bytes
    from services.runtime.redis_server import EmbeddedRedis, free_port
    from shared.wire.arrays import write_npy
    from shared.wire.protocol import AssistReply, encode_call
    from shared.wire.stream_client import AsyncStreamClient

    work = Path(tempfile.mkdtemp(prefix="vessa-bench-"))
    bank, base = setup_data(work, args.encoder, args.device)
    n_req, conc, spr = args.requests, args.concurrency, args.slices_per_request
    classes = None  # all classes of a slice in one pass
    modes = ["cold", "warm"] if args.mode == "both" else [args.mode]
    serial = iter(range(1, 1_000_000))

    def new_requests(k: int, size: int = spr) -> list[np.ndarray]:
        """k requests of never-seen slices (every call draws new seeds)."""
        return [make_slices(size, 100_003 * next(serial), base) for _ in range(k)]

    # ---------------------------------------------------------------- set everything up once
    # answer cache off everywhere: a warm row is the decoder on every request, not a remembered answer
    assistant = Assistant.from_files(
        "pretrained", bank, device=args.device, encoder=args.encoder, cache_device_entries=100_000, answer_cache_entries=0
    )
    assistant.predict([SliceInput(image=base[0])])  # lazy initialisation out of the timings
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {
        "ckpt": "pretrained",
        "bank": str(bank),
        "encoder": args.encoder,
        "device": args.device,
        "batch_wait_timeout_s": 0.005,
        "cache_device_entries": 100_000,
        "answer_cache_entries": 0,
        "max_upload_mb": 1024,
        "request_timeout_s": 3600,  # a cold 16-slice volume takes minutes on 2 CPU cores
    }
    # two apps (batched and not) share the one card: half a GPU each, or the second is never scheduled
    actor_opts: dict = {"num_cpus": 0, "num_gpus": 0.5 if args.device == "cuda" else 0}
    if args.device == "cpu":
        actor_opts["runtime_env"] = all_cores_runtime_env()  # as the in-process rows do
    actor = {"ray_actor_options": actor_opts, "max_ongoing_requests": 1024}
    ingress = {"ray_actor_options": {"num_cpus": 0}}
    serve.run(build_app({**common, "max_batch_slices": args.max_batch}, {"VessaAssistant": actor, "VessaIngress": ingress}), name="vessa", route_prefix="/")
    serve.run(build_app({**common, "max_batch_slices": 1}, {"VessaAssistant": actor, "VessaIngress": ingress}), name="nobatch", route_prefix="/nobatch")
    url = f"http://127.0.0.1:{port}"
    handle = serve.get_deployment_handle("VessaAssistant", app_name="vessa")
    nobatch = serve.get_deployment_handle("VessaAssistant", app_name="nobatch")
    redis_server = EmbeddedRedis(work / "redis").start()
    dispatchers = [
        Dispatcher(DispatcherSettings(redis_url=redis_server.url, consumer=f"bench-{i}", max_inflight=conc * 2), serve_handle_caller())
        for i in range(args.dispatchers)
    ]
    tasks = [asyncio.create_task(d.run()) for d in dispatchers]
    client = AsyncStreamClient(redis_server.url, "bench", max_in_flight=conc)
    await client.start()
    http = httpx.AsyncClient(base_url=url, timeout=600)

    async def via_handle(h, r):
        meta, blobs = encode_call(list(r), class_ids=classes)
        m, _ = await h.assist.remote(meta.model_dump_json(), blobs)
        assert AssistReply.model_validate_json(m).status == "ok"

    async def one_request(r):
        reply = await http.post("/v1/pseudo-labels", files={"file": ("s.npy", write_npy(r))})
        assert reply.status_code == 200, reply.text

    async def one_volume(p):
        reply = await http.post("/v1/pseudo-labels", files={"file": ("v.nii.gz", p)})
        assert reply.status_code == 200, reply.text

    async def via_redis(r):
        rid = await client.submit(r, class_ids=classes)
        res = await client.result(rid, 600)
        assert res is not None and res.status == "ok", res

    for fn in (lambda r: via_handle(handle, r), lambda r: via_handle(nobatch, r), one_request, via_redis):
        await fn(new_requests(1)[0])  # each path once, before anything is timed

    async def measure(mode: str) -> list[dict]:
        """Every path on never-seen slices (cold) or on slices each path has seen once (warm)."""
        warm = mode == "warm"
        rows: list[dict] = []

        async def timed_path(name: str, fn, reqs: list, concurrency: int, slices: int) -> dict:
            if warm:
                await run_concurrent(fn, reqs, concurrency)  # embeddings cached, hashes learned
            wall, lat = await run_concurrent(fn, reqs, concurrency)
            rows.append(row(name, slices, wall, lat, len(reqs)))
            return rows[-1]

        reqs = new_requests(n_req)
        if warm:
            assistant.predict([SliceInput(image=x) for r in reqs for x in r])
        lat = []
        t0 = time.perf_counter()
        for r in reqs:
            t1 = time.perf_counter()
            assistant.predict([SliceInput(image=x) for x in r], classes)
            lat.append(time.perf_counter() - t1)
        rows.append(row("in-process, one request at a time", n_req * spr, time.perf_counter() - t0, lat, n_req))
        reqs = new_requests(n_req)
        if warm:
            assistant.predict([SliceInput(image=x) for r in reqs for x in r])
        t0 = time.perf_counter()
        assistant.predict([SliceInput(image=x) for r in reqs for x in r], classes)
        wall = time.perf_counter() - t0
        rows.append(row("model alone (all slices as one batch)", n_req * spr, wall, [wall], 1))
        handle_row = await timed_path("DeploymentHandle", lambda r: via_handle(handle, r), new_requests(n_req), conc, n_req * spr)
        singles = [x[None] for x in new_requests(1, n_req * spr)[0]]
        await timed_path("HTTP, one slice per request", one_request, singles, conc, len(singles))
        vs = args.volume_slices
        n_vol = max(1, n_req * spr // vs)
        vols = [nifti_bytes(np.transpose(v, (1, 2, 0)).astype(np.float32), zooms=(1.5, 1.5, 8.0)) for v in new_requests(n_vol, vs)]
        await timed_path(f"HTTP, {vs}-slice volume per request", one_volume, vols, max(1, conc // 4), n_vol * vs)
        await timed_path("DeploymentHandle, @serve.batch off (1 slice/batch)", lambda r: via_handle(nobatch, r), new_requests(n_req), conc, n_req * spr)
        plural = "s" if args.dispatchers > 1 else ""
        await timed_path(f"Redis path ({args.dispatchers} dispatcher{plural})", via_redis, new_requests(n_req), conc, n_req * spr)
        for r in rows:
            r["ratio_to_handle"] = r["slices_per_s"] / handle_row["slices_per_s"] if handle_row["slices_per_s"] else float("nan")
        return rows

    results = {}
    for mode in modes:
        results[mode] = await measure(mode)
    results["_meta"] = {"model_stats": assistant.stats(), "redis_hash_only_slices": client.stats["hash_only_slices"]}
    await http.aclose()
    await client.close()
    for d in dispatchers:
        d.stop()
    await asyncio.gather(*tasks)
    redis_server.stop()
    # ray.shutdown() alone: it stops the local Ray instance this run started, Serve's actors with it; a
    # serve.shutdown() first would only drain the replicas gracefully (~5 s on CPU) with nothing in flight.
    ray.shutdown()
    return results


def print_table(rows: list[dict], title: str) -> str:
    lines = [title, f"{'path':52s} {'req':>5s} {'slices':>6s} {'slices/s':>9s} {'p50 ms':>9s} {'p99 ms':>9s} {'÷handle':>8s}"]
    for r in rows:
        if r["path"].startswith("_"):
            continue
        lines.append(
            f"{r['path']:52s} {r['requests']:5d} {r['slices']:6d} {r['slices_per_s']:9.2f} {r['p50_ms']:9.1f} {r['p99_ms']:9.1f} {r['ratio_to_handle']:8.2f}"
        )
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--encoder", default="litemedsam", choices=["litemedsam", "tiny"])
    p.add_argument("--mode", default="both", choices=["both", "warm", "cold"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--slices-per-request", type=int, default=1)
    p.add_argument("--volume-slices", type=int, default=16, help="slices per NIfTI volume on the REST volume path")
    p.add_argument("--max-batch", type=int, default=64, help="max slices per @serve.batch batch")
    p.add_argument("--dispatchers", type=int, default=1)
    p.add_argument("--ray-cpus", type=int, default=max(2, os.cpu_count() or 2))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    results = asyncio.run(bench(args))
    tables = []
    for mode, rows in results.items():
        if mode.startswith("_"):
            continue
        title = (
            f"VESSA serving paths — {mode}, {args.encoder}, device {args.device}, {args.requests} requests × "
            f"{args.slices_per_request} slice(s), concurrency {args.concurrency}, max batch {args.max_batch} — "
            f"{platform.node()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        )
        tables.append(print_table(rows, title))
    table = "\n\n".join(tables)
    out = {"args": vars(args) | {"json": str(args.json)}, "modes": results, "table": table, "machine": _machine(args.device)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _machine(device: str) -> str:
    import torch

    cpu = f"{os.cpu_count()} CPU cores"
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {cpu}"
    return cpu


if __name__ == "__main__":
    main()

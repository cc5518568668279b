"""Serving paths side by side, in one run: slices/s and latency, as ratios to the DeploymentHandle path.

    python -m benchmarks.serving [--device cpu] [--mode warm|cold] [--requests 64] [--concurrency 8]
                                 [--encoder litemedsam] [--json OUT]

Paths: the assistant in-process (one request at a time, and all at once as one batch: the model alone),
a DeploymentHandle, HTTP with one slice per request, HTTP with a 16-slice NIfTI volume per request,
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


def make_slices(n: int, seed: int, base: np.ndarray) -> np.ndarray:
    """n distinct canonical uint8 slices: real synthetic slices with a per-slice intensity twist."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), n)
    noise = rng.integers(0, 3, size=(n, 1, 1), dtype=np.uint8)
    return np.clip(base[idx].astype(np.int16) + noise + np.arange(n)[:, None, None] % 2, 0, 255).astype(np.uint8)


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
    from shared.canonical import canonical_slices
    from shared.data import open_dataset
    from shared.data.synth import write_msd_dataset

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

    from assistant_server.app import build_app
    from assistant_server.inference import Assistant, SliceInput
    from assistant_server.volume_io import nifti_bytes
    from services.dispatcher import Dispatcher, DispatcherSettings, serve_handle_caller
    from services.redis_server import EmbeddedRedis, free_port
    from shared.protocol import AssistReply, encode_call
    from shared.wire import write_npy
    from student_trainer.stream_client import AsyncStreamClient

    work = Path(tempfile.mkdtemp(prefix="vessa-bench-"))
    bank, base = setup_data(work, args.encoder, args.device)
    n_req, conc, spr = args.requests, args.concurrency, args.slices_per_request
    warm = args.mode == "warm"
    classes = None  # all classes of a slice in one pass
    rows: list[dict] = []

    def batch_of(k: int, seed: int) -> list[np.ndarray]:
        return [make_slices(spr, seed * 100_003 + i, base) for i in range(k)]

    def fresh(seed: int) -> list[np.ndarray]:
        return batch_of(n_req, seed if not warm else 0)

    # ---------------------------------------------------------------- in-process
    a = Assistant.from_files("pretrained", bank, device=args.device, encoder=args.encoder, cache_device_entries=100_000)
    a.predict([SliceInput(image=base[0])])  # warm-up
    reqs = fresh(1)
    if warm:
        a.predict([SliceInput(image=s) for r in reqs for s in r])
    lat = []
    t0 = time.perf_counter()
    for r in reqs:
        t1 = time.perf_counter()
        a.predict([SliceInput(image=s) for s in r], classes)
        lat.append(time.perf_counter() - t1)
    rows.append(row("in-process, one request at a time", n_req * spr, time.perf_counter() - t0, lat, n_req))
    reqs = fresh(2)
    if warm:
        a.predict([SliceInput(image=s) for r in reqs for s in r])
    t0 = time.perf_counter()
    a.predict([SliceInput(image=s) for r in reqs for s in r], classes)
    wall = time.perf_counter() - t0
    rows.append(row("model alone (all slices as one batch)", n_req * spr, wall, [wall], 1))
    model_stats = a.stats()
    del a

    # ---------------------------------------------------------------- Serve
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
        "max_upload_mb": 1024,
    }
    actor = {"ray_actor_options": {"num_cpus": 0, "num_gpus": 1 if args.device == "cuda" else 0}, "max_ongoing_requests": 1024}
    serve.run(
        build_app({**common, "max_batch_slices": args.max_batch}, {"VessaAssistant": actor, "VessaIngress": {"ray_actor_options": {"num_cpus": 0}}}),
        name="vessa",
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{port}"
    handle = serve.get_deployment_handle("VessaAssistant", app_name="vessa")

    async def via_handle(h, r):
        meta, blobs = encode_call(list(r), class_ids=classes)
        m, _ = await h.assist.remote(meta.model_dump_json(), blobs)
        assert AssistReply.model_validate_json(m).status == "ok"

    async def warm_up(reqs):
        if warm:
            await run_concurrent(lambda r: via_handle(handle, r), reqs, conc)

    reqs = fresh(3)
    await via_handle(handle, reqs[0])
    await warm_up(reqs)
    wall, lat = await run_concurrent(lambda r: via_handle(handle, r), reqs, conc)
    handle_row = row("DeploymentHandle", n_req * spr, wall, lat, n_req)
    rows.append(handle_row)

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:

        async def one_slice(s):
            r = await http.post("/v1/pseudo-labels", files={"file": ("s.npy", write_npy(s))})
            assert r.status_code == 200, r.text

        singles = [s for r in fresh(4) for s in r]
        await warm_up([s[None] for s in singles])
        wall, lat = await run_concurrent(one_slice, singles, conc)
        rows.append(row("HTTP, one slice per request", len(singles), wall, lat, len(singles)))

        n_vol = max(1, n_req * spr // 16)
        vols = [make_slices(16, 500 + i if not warm else 7 + i, base) for i in range(n_vol)]
        await warm_up(vols)
        payloads = [nifti_bytes(np.transpose(v, (1, 2, 0)).astype(np.float32), zooms=(1.5, 1.5, 8.0)) for v in vols]

        async def one_volume(p):
            r = await http.post("/v1/pseudo-labels", files={"file": ("v.nii.gz", p)})
            assert r.status_code == 200, r.text

        wall, lat = await run_concurrent(one_volume, payloads, max(1, conc // 4))
        rows.append(row("HTTP, 16-slice volume per request", n_vol * 16, wall, lat, n_vol))

    # ---------------------------------------------------------------- no batching
    serve.run(
        build_app({**common, "max_batch_slices": 1}, {"VessaAssistant": actor, "VessaIngress": {"ray_actor_options": {"num_cpus": 0}}}),
        name="nobatch",
        route_prefix="/nobatch",
    )
    h1 = serve.get_deployment_handle("VessaAssistant", app_name="nobatch")
    reqs = fresh(5)
    await via_handle(h1, reqs[0])
    if warm:
        await run_concurrent(lambda r: via_handle(h1, r), reqs, conc)
    wall, lat = await run_concurrent(lambda r: via_handle(h1, r), reqs, conc)
    rows.append(row("DeploymentHandle, @serve.batch off (1 slice/batch)", n_req * spr, wall, lat, n_req))
    serve.delete("nobatch")

    # ---------------------------------------------------------------- Redis path
    redis_server = EmbeddedRedis(work / "redis").start()
    dispatchers = []
    tasks = []
    for i in range(args.dispatchers):
        d = Dispatcher(DispatcherSettings(redis_url=redis_server.url, consumer=f"bench-{i}", max_inflight=conc * 2), serve_handle_caller())
        dispatchers.append(d)
        tasks.append(asyncio.create_task(d.run()))
    client = AsyncStreamClient(redis_server.url, "bench", max_in_flight=conc)
    await client.start()

    async def via_redis(r):
        rid = await client.submit(r, class_ids=classes)
        res = await client.result(rid, 600)
        assert res is not None and res.status == "ok", res

    reqs = fresh(6)
    await via_redis(reqs[0])
    if warm:
        await run_concurrent(via_redis, reqs, conc)  # the assistant caches, the client learns the hashes
    wall, lat = await run_concurrent(via_redis, reqs, conc)
    rows.append(row(f"Redis path ({args.dispatchers} dispatcher{'s' if args.dispatchers > 1 else ''})", n_req * spr, wall, lat, n_req))
    hash_only = client.stats["hash_only_slices"]
    await client.close()
    for d in dispatchers:
        d.stop()
    await asyncio.gather(*tasks)
    redis_server.stop()
    serve.shutdown()
    ray.shutdown()

    base_rate = handle_row["slices_per_s"]
    for r in rows:
        r["ratio_to_handle"] = r["slices_per_s"] / base_rate if base_rate else float("nan")
    rows.append({"path": "_meta", "model_stats": model_stats, "redis_hash_only_slices": hash_only})
    return rows


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
    p.add_argument("--mode", default="warm", choices=["warm", "cold"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--slices-per-request", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=64, help="max slices per @serve.batch batch")
    p.add_argument("--dispatchers", type=int, default=1)
    p.add_argument("--ray-cpus", type=int, default=max(2, os.cpu_count() or 2))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = asyncio.run(bench(args))
    title = (
        f"VESSA serving paths — {args.mode}, {args.encoder}, device {args.device}, {args.requests} requests × "
        f"{args.slices_per_request} slice(s), concurrency {args.concurrency}, max batch {args.max_batch} — "
        f"{platform.node()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    table = print_table(rows, title)
    out = {"args": vars(args) | {"json": str(args.json)}, "rows": rows, "table": table, "machine": _machine(args.device)}
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

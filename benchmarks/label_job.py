"""A labeling job's rate next to the model-alone rate of the same replicas, and what a job does to a
trainer's latency (issue 16; docs/benchmarks.md, "Labeling jobs").

    python -m benchmarks.label_job [--device cpu] [--encoder tiny|litemedsam] [--cases 4]
                                   [--batch-slices 8] [--max-in-flight 4] [--json OUT]

One local Ray + Serve app (one replica on every core, answer cache off), an embedded Redis and an
in-process dispatcher. Three synthetic datasets of the same size (different seeds), so every timed
slice is new to the replica (cold: the encoder runs in every row):

1. model alone: dataset A's canonical slices straight into the replicas (DeploymentHandle), in requests
   of `batch_slices`, `max_in_flight` at once: no files, no Redis, no writing;
2. the job: dataset B through `LabelRunner` (read and hash NIfTI files, Redis request stream,
   dispatcher, replicas, resize back, write NIfTI + records + manifest), the same request size and bound;
   the ratio job ÷ model alone is the figure (target ≥ 0.8);
3. a trainer's one-slice requests (slices the replica knows: the Stage-2 case), one at a time, alone and
   while a job labels dataset C: the latency a job adds (bounded by the job's `max_in_flight`).
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


def _canonical(data: Path) -> np.ndarray:
    from services.labeling.cases import discover, read_case
    from shared.wire.canonical import canonical_slices

    return np.concatenate([canonical_slices(list(read_case(c).image)) for c in discover(data).cases])


async def bench(args) -> dict:
    import ray
    from ray import serve

    from assistant_server.bank_builder import build_bank
    from services.dispatch.dispatcher import Dispatcher, DispatcherSettings
    from services.dispatch.launch import serve_handle_caller
    from services.ingress.app import all_cores_runtime_env, build_app
    from services.labeling.runner import LabelRunner
    from services.runtime.redis_server import EmbeddedRedis, free_port
    from shared.data.synth import write_msd_dataset
    from shared.jobs import JobSpec
    from shared.wire.protocol import AssistReply, encode_call
    from shared.wire.stream_client import AsyncStreamClient

    work = Path(tempfile.mkdtemp(prefix="vessa-label-bench-"))
    sets = {}
    for name, seed in (("A", 1), ("B", 2), ("C", 3)):
        sets[name] = work / name
        write_msd_dataset(sets[name], cases=args.cases, seed=seed)
    bank = work / "bank"
    build_bank(sets["A"], 1, bank, encoder=args.encoder, device=args.device)
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    opts: dict = {"num_cpus": 0, "num_gpus": 1 if args.device == "cuda" else 0}
    if args.device == "cpu":
        opts["runtime_env"] = all_cores_runtime_env()
    app_args = {
        "ckpt": "pretrained" if args.encoder == "litemedsam" else "random",
        "bank": str(bank),
        "encoder": args.encoder,
        "device": args.device,
        "max_batch_slices": args.max_batch,
        "batch_wait_timeout_s": 0.005,
        "cache_device_entries": 100_000,
        "answer_cache_entries": 0,
    }
    serve.run(build_app(app_args, {"VessaAssistant": {"ray_actor_options": opts, "max_ongoing_requests": 1024}, "VessaIngress": {"ray_actor_options": {"num_cpus": 0}}}), name="vessa", route_prefix="/")
    handle = serve.get_deployment_handle("VessaAssistant", app_name="vessa")
    redis_server = EmbeddedRedis(work / "redis").start()
    disp = Dispatcher(DispatcherSettings(redis_url=redis_server.url, consumer="bench", max_inflight=64), serve_handle_caller())
    disp_task = asyncio.create_task(disp.run())
    out: dict = {}
    try:
        # warm-up out of the timings: one call through every path (a slice no dataset holds)
        blank = np.full((1, 256, 256), 7, np.uint8)
        meta, blobs = encode_call(list(blank))
        await handle.assist.remote(meta.model_dump_json(), blobs)

        # 1. model alone ----------------------------------------------------------------------------
        slices_a = _canonical(sets["A"])
        batches = [slices_a[i : i + args.batch_slices] for i in range(0, len(slices_a), args.batch_slices)]
        sem = asyncio.Semaphore(args.max_in_flight)

        async def call(b):
            async with sem:
                m, _ = await handle.assist.remote(*_encoded(b, encode_call))
                assert AssistReply.model_validate_json(m).status == "ok"

        t0 = time.perf_counter()
        await asyncio.gather(*[call(b) for b in batches])
        model_s = time.perf_counter() - t0
        out["model_alone"] = {"slices": len(slices_a), "seconds": model_s, "slices_per_s": len(slices_a) / model_s}

        # 2. the job --------------------------------------------------------------------------------
        job = JobSpec(data=str(sets["B"]), out=str(work / "out_B"), selection="all", batch_slices=args.batch_slices, max_in_flight=args.max_in_flight, cases_in_flight=args.cases_in_flight)
        t0 = time.perf_counter()
        s = await LabelRunner(job, redis_server.url).run()
        job_s = time.perf_counter() - t0
        out["job"] = {"slices": s.slices, "cases": s.labeled, "seconds": job_s, "slices_per_s": s.slices / job_s, "failed": s.failed}
        out["job_over_model_alone"] = out["job"]["slices_per_s"] / out["model_alone"]["slices_per_s"]

        # 3. a trainer beside a job -------------------------------------------------------------------
        trainer = AsyncStreamClient(redis_server.url, "bench-trainer", max_in_flight=1)
        await trainer.start()
        known = slices_a[:: max(1, len(slices_a) // args.trainer_requests)][: args.trainer_requests]

        async def latencies() -> list[float]:
            lat = []
            for img in known:
                t = time.perf_counter()
                rid = await trainer.submit(img[None])
                res = await trainer.result(rid, 600)
                assert res is not None and res.status == "ok", res
                lat.append(time.perf_counter() - t)
            return lat

        alone = await latencies()
        job_c = LabelRunner(JobSpec(data=str(sets["C"]), out=str(work / "out_C"), selection="all", batch_slices=args.batch_slices, max_in_flight=args.max_in_flight, cases_in_flight=args.cases_in_flight), redis_server.url)
        job_task = asyncio.create_task(job_c.run())
        while job_c.client is None or job_c.client.in_flight == 0:  # the job is on the stream
            await asyncio.sleep(0.05)
        beside = await latencies()
        job_running = not job_task.done()
        await job_task
        await trainer.close()
        out["trainer"] = {
            "requests": len(known),
            "alone_p50_s": float(np.median(alone)),
            "alone_max_s": float(np.max(alone)),
            "beside_job_p50_s": float(np.median(beside)),
            "beside_job_max_s": float(np.max(beside)),
            "job_still_running_at_the_end": job_running,
            "bound_slices_ahead": args.max_in_flight * args.batch_slices,
        }
    finally:
        disp.stop()
        await disp_task
        redis_server.stop()
        ray.shutdown()
    return out


def _encoded(batch: np.ndarray, encode_call) -> tuple[str, list[bytes]]:
    meta, blobs = encode_call(list(batch))
    return meta.model_dump_json(), blobs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--encoder", default="tiny", choices=["tiny", "litemedsam"])
    p.add_argument("--cases", type=int, default=4, help="synthetic cases per dataset (12 slices each)")
    p.add_argument("--batch-slices", type=int, default=8)
    p.add_argument("--max-in-flight", type=int, default=4)
    p.add_argument("--cases-in-flight", type=int, default=3)
    p.add_argument("--max-batch", type=int, default=16, help="max slices per @serve.batch batch")
    p.add_argument("--trainer-requests", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    res = asyncio.run(bench(args))
    m, j, t = res["model_alone"], res["job"], res["trainer"]
    table = "\n".join(
        [
            f"labeling job vs model alone — {args.encoder}, {args.device}, {args.cases} cases per set, requests of {args.batch_slices} slices, "
            f"{args.max_in_flight} in flight — {platform.node()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"{'path':40s} {'slices':>6s} {'s':>8s} {'slices/s':>9s}",
            f"{'model alone (DeploymentHandle)':40s} {m['slices']:6d} {m['seconds']:8.1f} {m['slices_per_s']:9.2f}",
            f"{'job (files → Redis → replicas → files)':40s} {j['slices']:6d} {j['seconds']:8.1f} {j['slices_per_s']:9.2f}",
            f"job ÷ model alone: {res['job_over_model_alone']:.2f} (target ≥ 0.8)",
            f"trainer 1-slice request latency: alone p50 {t['alone_p50_s'] * 1000:.0f} ms (max {t['alone_max_s'] * 1000:.0f}); "
            f"beside a job p50 {t['beside_job_p50_s'] * 1000:.0f} ms (max {t['beside_job_max_s'] * 1000:.0f}); "
            f"the job keeps at most {t['bound_slices_ahead']} slices ahead of it",
        ]
    )
    print(table)
    res["table"] = table
    res["args"] = {k: str(v) for k, v in vars(args).items()}
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

"""MONAI Label's `infer` from 8 clients at once on 2 replicas, and `GET /info/` while they run (issue 28;
docs/benchmarks.md, "MONAI Label clients").

    python -m benchmarks.monailabel_clients [--clients 8] [--replicas 2] [--cases 8] [--encoder tiny]
                                            [--ckpt random] [--bank DIR] [--json OUT]

One local Ray + Serve app with a MONAI Label datastore over a synthetic MSD dataset; every call is made
by the `monailabel` package's own client (`MONAILabelClient.infer`), a new client per call as Slicer
makes one. Rows: one client alone (each case once, one after the other), then `--clients` clients at
once (each one case); meanwhile a poller asks `GET /info/` every 100 ms. MONAI Label's own server runs
an inference in its one worker, so its `/info/` waits behind it (MONAILabel #1487); VESSA's ingress
only waits on the replicas for the inference itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench(args) -> dict:
    import httpx
    import ray
    from monailabel.client import MONAILabelClient
    from ray import serve

    from assistant_server.bank_builder import build_bank
    from services.ingress.app import build_app
    from services.runtime.net import free_port, wait_ready
    from shared.data.synth import write_msd_dataset

    work = Path(tempfile.mkdtemp(prefix="vessa-ml-bench-"))
    data = work / "data"
    write_msd_dataset(data / "study", cases=args.cases, seed=5)
    bank = Path(args.bank) if args.bank else work / "bank"
    if not args.bank:
        build_bank(data / "study", 3, bank, encoder=args.encoder, device="cpu")
    port = free_port()
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {
        "ckpt": args.ckpt,
        "encoder": args.encoder,
        "device": "cpu",
        "bank": str(bank),
        "data_root": str(data),
        "monailabel_datastore": "study",
    }
    serve.run(build_app(app_args, {"VessaAssistant": {"num_replicas": args.replicas, "ray_actor_options": {"num_cpus": 0}}}), name="vessa")
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 600)
    tmp = work / "client"
    tmp.mkdir()
    cases = sorted(MONAILabelClient(url).datastore()["objects"])

    def infer(case: str) -> float:
        t0 = time.perf_counter()
        MONAILabelClient(url, tmpdir=str(tmp)).infer("vessa", case, {})
        return time.perf_counter() - t0

    infer(cases[0])  # warm: the class table, the first call's lazy set-up
    with httpx.Client(timeout=60) as h:
        idle_info = []
        for _ in range(10):
            t0 = time.perf_counter()
            h.get(url + "/info/").raise_for_status()
            idle_info.append(time.perf_counter() - t0)
    alone = [infer(c) for c in cases]

    latencies: list[float] = []
    errors: list[str] = []

    def client(i: int) -> None:
        try:
            latencies.append(infer(cases[i % len(cases)]))
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    busy_info = []
    with httpx.Client(timeout=60) as h:
        while any(t.is_alive() for t in threads):
            s = time.perf_counter()
            h.get(url + "/info/").raise_for_status()
            busy_info.append(time.perf_counter() - s)
            time.sleep(0.1)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "encoder": args.encoder,
        "ckpt": args.ckpt,
        "replicas": args.replicas,
        "clients": args.clients,
        "case_shape": list(__import__("nibabel").load(sorted((data / "study" / "imagesTr").glob("*.nii.gz"))[0]).shape),
        "alone_s": {"mean": statistics.mean(alone), "max": max(alone), "calls": len(alone)},
        "concurrent": {
            "finished": len(latencies),
            "errors": errors,
            "wall_s": wall,
            "latency_p50_s": _pct(latencies, 0.5) if latencies else None,
            "latency_max_s": max(latencies) if latencies else None,
            "calls_per_s": len(latencies) / wall,
        },
        "info_idle_s": {"p50": _pct(idle_info, 0.5), "max": max(idle_info)},
        "info_during_s": {"n": len(busy_info), "p50": _pct(busy_info, 0.5), "max": max(busy_info)} if busy_info else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--encoder", default="tiny")
    p.add_argument("--ckpt", default="random")
    p.add_argument("--bank", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result = bench(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()

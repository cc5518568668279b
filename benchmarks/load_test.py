"""A bounded load test of the REST API on this machine: loopback only, stops by itself.

    python -m benchmarks.load_test [--url http://127.0.0.1:8000] [--requests 10000] [--concurrency 64]
                                   [--pl-fraction 0.05] [--warmup 400] [--max-seconds 900]
                                   [--json runs/load_test.json] [--docs docs/benchmarks.md]

Without --url it starts its own local Ray + Serve application from the CPU profile
(deploy/serve_cpu.yaml) with the tiny encoder, random weights and a bank built from the synthetic
dataset, and shuts it down at the end. The traffic is a mix of POST /v1/pseudo-labels (one small .npy
slice from a fixed pool, so the embedding cache behaves as in Stage 2) and GET /healthz and /v1/info,
at a fixed concurrency, for a fixed number of requests (or --max-seconds, whichever comes first).

It passes when every response is a 200 or a deliberate backpressure answer (429/503), and the resident
memory (RSS) of every process — the Serve replicas (`ServeReplica` in their command line), the
ProxyActor, the ServeController and the driver — is flat between the end of the warm-up and the end of
the run (growth at most --rss-tolerance-mb or --rss-tolerance-pct, whichever is larger). It prints a
table, writes JSON, and with --docs appends a dated entry to the "Load test" section of that file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
ROLES = (("ServeReplica", "replica"), ("ProxyActor", "proxy"), ("ServeController", "controller"))


# ---------------------------------------------------------------------------------------------- processes
def find_processes(driver_pid: int | None) -> dict[str, psutil.Process]:
    """Role name → process: Serve replicas, the proxy, the controller (by command line), the driver."""
    found: dict[str, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        for needle, role in ROLES:
            if needle in cmd:
                name = role
                if role == "replica":  # ray::ServeReplica:<app>:<deployment>
                    name = "replica " + cmd.split("ServeReplica:", 1)[-1].split()[0]
                key, i = name, 2
                while key in found:
                    key, i = f"{name} #{i}", i + 1
                found[key] = p
    if driver_pid is not None:
        found["driver (this process)"] = psutil.Process(driver_pid)
    return found


def rss_mb(procs: dict[str, psutil.Process]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, p in procs.items():
        try:
            out[name] = p.memory_info().rss / 2**20
        except psutil.Error:
            out[name] = None  # the process is gone (a replica restarted): reported, and fails the run
    return out


# ---------------------------------------------------------------------------------------------- local app
def start_local_app(workdir: Path, port: int) -> str:
    import ray
    from ray import serve

    from assistant_server.bank_builder import build_bank
    from services.cli.serve import application_options, load_serve_config
    from services.ingress.app import build_app
    from shared.data.synth import write_msd_dataset

    data = workdir / "synth"
    write_msd_dataset(data, cases=6, seed=0)
    bank = workdir / "bank"
    build_bank(data, 3, bank, encoder="tiny", device="cpu")
    cfg = load_serve_config(ROOT / "deploy" / "serve_cpu.yaml")
    args, deployments, _http = application_options(
        cfg, {"ckpt": "random", "bank": str(bank), "encoder": "tiny", "device": "cpu"}, None, None
    )
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args, deployments), name="vessa", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_local_app() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def wait_ready(url: str, timeout: float = 300) -> None:
    from services.runtime.net import wait_ready as poll_ready

    try:
        poll_ready(url, timeout, probe_timeout=10)
    except TimeoutError as exc:
        raise SystemExit(str(exc)) from None


# ---------------------------------------------------------------------------------------------- load
def slice_pool(n: int, side: int, seed: int = 0) -> list[bytes]:
    """n distinct smooth (side, side) float32 slices as .npy bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7, 3) * [1, 1, 0.5]
        img = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 2) ** 2)) + 0.05 * rng.standard_normal((side, side))
        bio = io.BytesIO()
        np.save(bio, img.astype(np.float32), allow_pickle=False)
        out.append(bio.getvalue())
    return out


class Stats:
    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.ok: dict[str, int] = {}
        self.backpressure: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.error_samples: list[str] = []
        self.latency: dict[str, list[float]] = {}

    def add(self, route: str, status: int | None, seconds: float, detail: str = "") -> None:
        self.count[route] = self.count.get(route, 0) + 1
        self.latency.setdefault(route, []).append(seconds)
        if status == 200:
            self.ok[route] = self.ok.get(route, 0) + 1
        elif status in (429, 503):
            self.backpressure[route] = self.backpressure.get(route, 0) + 1
        else:
            self.errors[route] = self.errors.get(route, 0) + 1
            if len(self.error_samples) < 20:
                self.error_samples.append(f"{route}: {status} {detail[:200]}")

    def total(self, d: dict[str, int]) -> int:
        return sum(d.values())


async def run_load(
    url: str,
    n: int,
    concurrency: int,
    pl_fraction: float,
    pool: list[bytes],
    max_seconds: float,
    seed: int,
    token: str | None,
    sampler=None,
    stats: Stats | None = None,
) -> tuple[Stats, float]:
    import httpx

    from services.ingress.client import parse_multipart

    rng = random.Random(seed)
    plan = []
    for i in range(n):
        u = rng.random()
        if u < pl_fraction:
            plan.append(("/v1/pseudo-labels", i % len(pool)))
        elif u < pl_fraction + (1 - pl_fraction) * 0.6:
            plan.append(("/healthz", None))
        else:
            plan.append(("/v1/info", None))
    stats = stats if stats is not None else Stats()
    next_i = 0
    deadline = time.monotonic() + max_seconds
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:

        async def worker() -> None:
            nonlocal next_i
            while next_i < len(plan) and time.monotonic() < deadline:
                route, k = plan[next_i]
                next_i += 1
                t0 = time.perf_counter()
                try:
                    if route == "/v1/pseudo-labels":
                        r = await client.post(route, files={"file": ("s.npy", pool[k])})
                        if r.status_code == 200 and k % 16 == 0:  # check some answers end to end
                            meta, payload, _ = parse_multipart(r)
                            assert meta["slices"] == 1 and payload[:6] == b"\x93NUMPY", meta
                    else:
                        r = await client.get(route)
                    stats.add(route, r.status_code, time.perf_counter() - t0, r.text if r.status_code != 200 else "")
                except Exception as exc:  # a connection error or a malformed answer is an error
                    stats.add(route, None, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        if sampler is not None:
            tasks.append(asyncio.create_task(sampler()))
        await asyncio.gather(*tasks[:concurrency])
        for t in tasks[concurrency:]:
            t.cancel()
        return stats, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- report
def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else float("nan")


def report(args, url: str, warm: Stats, stats: Stats, wall: float, rss_start, rss_end, rss_peak, samples) -> dict:
    routes = sorted(stats.count)
    per_route = {
        r: {
            "requests": stats.count[r],
            "ok": stats.ok.get(r, 0),
            "backpressure_429_503": stats.backpressure.get(r, 0),
            "errors": stats.errors.get(r, 0),
            "p50_ms": pct(stats.latency[r], 50),
            "p99_ms": pct(stats.latency[r], 99),
        }
        for r in routes
    }
    memory = {}
    flat = True
    for name in rss_start:
        a, b = rss_start[name], rss_end.get(name)
        growth = None if a is None or b is None else b - a
        ok = growth is not None and growth <= max(args.rss_tolerance_mb, a * args.rss_tolerance_pct / 100)
        flat &= ok
        memory[name] = {"rss_start_mb": a, "rss_end_mb": b, "rss_peak_mb": rss_peak.get(name), "growth_mb": growth, "flat": ok}
    total = stats.total(stats.count)
    errors = stats.total(stats.errors)
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()} {platform.release()}",
        "load_average_at_end": list(os.getloadavg()),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.load_test", *sys.argv[1:]]),
        "url": url,
        "concurrency": args.concurrency,
        "warmup_requests": warm.total(warm.count),
        "requests": total,
        "seconds": wall,
        "requests_per_s": total / wall if wall else float("nan"),
        "pseudo_label_slices_per_s": stats.ok.get("/v1/pseudo-labels", 0) / wall if wall else float("nan"),
        "errors": errors,
        "backpressure": stats.total(stats.backpressure),
        "error_samples": stats.error_samples,
        "routes": per_route,
        "memory": memory,
        "rss_samples": samples,
        "passed": errors == 0 and flat and total >= min(args.requests, 1),
    }
    print(f"\n{total} requests in {wall:.1f} s = {result['requests_per_s']:.1f} req/s at concurrency {args.concurrency}")
    print(f"{'route':<22}{'requests':>9}{'ok':>8}{'429/503':>9}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for r, v in per_route.items():
        print(
            f"{r:<22}{v['requests']:>9}{v['ok']:>8}{v['backpressure_429_503']:>9}{v['errors']:>8}"
            f"{v['p50_ms']:>9.1f}{v['p99_ms']:>9.1f}"
        )
    print(f"\n{'process':<40}{'RSS start MB':>13}{'end MB':>9}{'peak MB':>9}{'growth':>9}  flat")
    for name, m in memory.items():
        f = lambda v: "gone" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"{name:<40}{f(m['rss_start_mb']):>13}{f(m['rss_end_mb']):>9}{f(m['rss_peak_mb']):>9}{f(m['growth_mb']):>9}  {m['flat']}")
    for s in stats.error_samples[:5]:
        print("error:", s)
    print("PASSED" if result["passed"] else "FAILED")
    return result


def append_docs(path: Path, result: dict) -> None:
    """Append this run under a '## Load test' section (created if missing); other sections untouched."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = [
        f"### {result['date']}",
        "",
        f"- Machine: {result['machine']}; load average at the end {', '.join(f'{x:.1f}' for x in result['load_average_at_end'])} "
        "(the machine is shared: other jobs ran meanwhile).",
        f"- Command: `{result['command']}` (against {result['url']}).",
        f"- {result['requests']} requests after {result['warmup_requests']} warm-up, concurrency {result['concurrency']}, "
        f"{result['seconds']:.0f} s: {result['requests_per_s']:.1f} req/s overall, "
        f"{result['pseudo_label_slices_per_s']:.1f} pseudo-labeled slices/s; errors {result['errors']}, "
        f"429/503 backpressure {result['backpressure']}. Result: {'PASSED' if result['passed'] else 'FAILED'}.",
        "",
        "| route | requests | ok | 429/503 | errors | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r, v in result["routes"].items():
        lines.append(
            f"| `{r}` | {v['requests']} | {v['ok']} | {v['backpressure_429_503']} | {v['errors']} | {v['p50_ms']:.0f} | {v['p99_ms']:.0f} |"
        )
    lines += ["", "| process | RSS after warm-up (MB) | RSS at end (MB) | peak (MB) | growth (MB) | flat |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, m in result["memory"].items():
        f = lambda v: "gone" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(f"| {name} | {f(m['rss_start_mb'])} | {f(m['rss_end_mb'])} | {f(m['rss_peak_mb'])} | {f(m['growth_mb'])} | {'yes' if m['flat'] else 'no'} |")
    entry = "\n".join(lines) + "\n"
    header = "## Load test"
    if header not in text:
        intro = (
            f"\n{header}\n\n`benchmarks/load_test.py`: a bounded REST load test on one machine (loopback; its own "
            "local Serve app from deploy/serve_cpu.yaml with the tiny encoder unless `--url`), a mix of "
            "`/v1/pseudo-labels` (one small .npy slice), `/healthz` and `/v1/info`. It passes with zero errors "
            "other than deliberate 429/503 backpressure and flat RSS for every Serve process and the driver "
            "between the end of the warm-up and the end of the run. Latest run last.\n\n"
        )
        text = text.rstrip("\n") + "\n" + intro + entry
    else:
        start = text.index(header)
        nxt = text.find("\n## ", start + len(header))
        end = len(text) if nxt == -1 else nxt + 1
        section = text[start:end].rstrip("\n") + "\n\n" + entry
        text = text[:start] + section + ("\n" + text[end:] if nxt != -1 else "")
    path.write_text(text)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running VESSA server (default: start a local one)")
    ap.add_argument("--token", default=os.environ.get("VESSA_API_TOKEN"))
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument(
        "--pl-fraction",
        type=float,
        default=0.05,
        help="share of /v1/pseudo-labels requests (a 2-core CPU box answers a few slices/s: 5%% keeps "
        "10,000 requests within minutes; raise it on bigger machines)",
    )
    ap.add_argument("--pool", type=int, default=32, help="distinct slices sent")
    ap.add_argument("--side", type=int, default=96, help="slice side in pixels")
    ap.add_argument("--warmup", type=int, default=400)
    ap.add_argument("--max-seconds", type=float, default=900, help="stop after this long whatever the count")
    ap.add_argument("--rss-tolerance-mb", type=float, default=64)
    ap.add_argument("--rss-tolerance-pct", type=float, default=10)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "load_test.json")
    ap.add_argument("--docs", type=Path, help="append the result to this markdown file (docs/benchmarks.md)")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    local = args.url is None
    tmp = None
    if local:
        if args.port == 0:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                args.port = s.getsockname()[1]
        tmp = tempfile.TemporaryDirectory(prefix="vessa-load-")
        print("starting a local Serve app (CPU profile, tiny encoder)...", flush=True)
        url = start_local_app(Path(tmp.name), args.port)
    else:
        url = args.url.rstrip("/")
        if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
            raise SystemExit("--url must be a loopback address: this test never leaves the machine")
    try:
        wait_ready(url)
        pool = slice_pool(args.pool, args.side, args.seed)
        print(f"warm-up: every slice of the pool once, then {args.warmup} mixed requests...", flush=True)
        warm, _ = asyncio.run(
            run_load(url, args.pool, args.concurrency, 1.0, pool, args.max_seconds, args.seed + 1, args.token)
        )
        warm2, _ = asyncio.run(
            run_load(url, args.warmup, args.concurrency, args.pl_fraction, pool, args.max_seconds, args.seed + 2, args.token)
        )
        for k in warm2.count:
            warm.count[k] = warm.count.get(k, 0) + warm2.count[k]
            warm.errors[k] = warm.errors.get(k, 0) + warm2.errors.get(k, 0)
        warm.error_samples += warm2.error_samples
        if warm.total(warm.errors):
            print("warm-up errors:", warm.error_samples[:5])
        procs = find_processes(os.getpid() if local else None)
        if not any(k.startswith("replica") for k in procs):
            print("warning: no ServeReplica process found on this machine; RSS covers what was found")
        rss_start = rss_mb(procs)
        rss_peak = dict(rss_start)
        samples: list[dict] = []
        progress = Stats()

        async def sampler():
            t0 = time.monotonic()
            while True:
                await asyncio.sleep(5)
                now = rss_mb(procs)
                samples.append({"t": round(time.monotonic() - t0, 1), **{k: (round(v, 1) if v else v) for k, v in now.items()}})
                for k, v in now.items():
                    if v is not None and (rss_peak.get(k) or 0) < v:
                        rss_peak[k] = v
                if len(samples) % 6 == 0:  # progress every 30 s
                    done = sum(progress.count.values())
                    print(f"  {samples[-1]['t']:.0f} s: {done} requests, {sum(progress.errors.values())} errors", flush=True)

        print(f"load: {args.requests} requests at concurrency {args.concurrency}...", flush=True)
        stats, wall = asyncio.run(
            run_load(
                url, args.requests, args.concurrency, args.pl_fraction, pool, args.max_seconds, args.seed, args.token,
                sampler, progress,
            )
        )
        rss_end = rss_mb(procs)
        result = report(args, url, warm, stats, wall, rss_start, rss_end, rss_peak, samples)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
        if args.docs:
            append_docs(args.docs, result)
            print(f"appended to {args.docs}")
        return 0 if result["passed"] else 1
    finally:
        if local:
            stop_local_app()
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())

"""`vessa serve`, `vessa dispatcher`, `vessa redis`: the long-running processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer
import yaml

from services.cli.options import ENGINE_HELP, PRECISION_HELP, check_engine, check_engine_precision

DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parents[1] / "runtime" / "serve_configs" / "serve_cpu.yaml"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("dispatcher")(dispatcher_cmd)
    app.command("redis")(redis_cmd)


def load_serve_config(path: Path | None) -> dict:
    """The Serve config file (deploy/*.yaml) as a dict; its `vessa` application is what we deploy."""
    if path is None:
        # packaged with the code (an installed wheel has no deploy/); deploy/serve_cpu.yaml is the same
        # file for `serve run`, and a test keeps the two equal
        path = DEFAULT_SERVE_CONFIG
    if not path.is_file():
        raise typer.BadParameter(f"Serve config not found: {path}")
    return yaml.safe_load(path.read_text())


def application_options(
    config: dict, overrides: dict, replicas: int | None, gpus: float | None
) -> tuple[dict, dict, dict]:
    """(args, deployment options, http options) from a Serve config plus CLI overrides."""
    apps = config.get("applications") or []
    app_cfg = next((a for a in apps if a.get("name") == "vessa"), apps[0] if apps else {})
    args = dict(app_cfg.get("args") or {})
    args.update({k: v for k, v in overrides.items() if v is not None})
    deployments = {}
    for d in app_cfg.get("deployments") or []:
        opts = {k: v for k, v in d.items() if k != "name"}
        deployments[d["name"]] = opts
    assistant = deployments.setdefault("VessaAssistant", {})
    if replicas is not None:
        assistant.pop("autoscaling_config", None)
        assistant["num_replicas"] = replicas
    if gpus is not None:
        assistant.setdefault("ray_actor_options", {})["num_gpus"] = gpus
    return args, deployments, dict(config.get("http_options") or {})


def serve_cmd(
    ckpt: str | None = typer.Option(None, "--ckpt", help="assistant checkpoint, 'pretrained' or 'random'"),
    bank: Path | None = typer.Option(None, "--bank", help="template bank directory"),
    config: Path | None = typer.Option(None, "--config", help="Serve config (default deploy/serve_cpu.yaml)"),
    replicas: int | None = typer.Option(
        None, "--replicas", help="fixed assistant replica count (overrides autoscaling)"
    ),
    gpus_per_replica: float | None = typer.Option(
        None, "--gpus-per-replica", help="GPU share of each replica (e.g. 0.5)"
    ),
    address: str | None = typer.Option(
        None, "--address", help="join this Ray cluster (default: start a local one)"
    ),
    host: str | None = typer.Option(None, help="HTTP host (default from the config)"),
    port: int | None = typer.Option(None, help="HTTP port (default from the config)"),
    encoder: str | None = typer.Option(None, help="litemedsam or tiny"),
    device: str | None = typer.Option(None, help="cpu or cuda"),
    engine: str | None = typer.Option(None, "--engine", help=ENGINE_HELP + " (default: the config's, auto)"),
    engine_precision: str | None = typer.Option(None, "--engine-precision", help=PRECISION_HELP + " (default: the config's, f32)"),
    stream: bool = typer.Option(
        False,
        "--stream/--no-stream",
        help="also serve the Redis path: Redis (VESSA_REDIS_URL or embedded) + a dispatcher",
    ),
    run_dir: Path = typer.Option(Path("runs/serve"), help="where the embedded Redis keeps its AOF"),
    num_cpus: int | None = typer.Option(None, help="CPUs of a local Ray instance"),
):
    """Start (or join) Ray, deploy the VESSA Serve application, print its URL, stop cleanly on Ctrl-C.

    Exit status: 0 after Ctrl-C/SIGTERM (also while waiting for replicas), 2 when the cluster cannot
    place the replicas asked for (checked before deploying), 1 when the deployment fails."""
    import ray
    from ray import serve

    from services.ingress.app import build_app
    from services.runtime.placement import PlacementError, check_placement

    check_engine(engine)
    check_engine_precision(engine_precision)
    cfg = load_serve_config(config)
    args, deployments, http = application_options(
        cfg,
        {
            "ckpt": ckpt,
            "bank": str(bank) if bank else None,
            "encoder": encoder,
            "device": device,
            "engine": engine,
            "engine_precision": engine_precision,
        },
        replicas,
        gpus_per_replica,
    )
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    redis_server = dispatcher = None
    if stream:
        from services.runtime.redis_server import redis_url_or_embedded

        url, redis_server = redis_url_or_embedded(run_dir)
        args.setdefault("redis_url", url)
    if args.get("redis_url") and not os.environ.get("VESSA_REDIS_URL"):
        # a local Ray's processes inherit it: the backlog autoscaling policy runs in Serve's controller
        os.environ["VESSA_REDIS_URL"] = args["redis_url"]
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    def _handle_signals():
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)

    def _check(nodes: list[dict]) -> None:
        try:
            for warning in check_placement(
                deployments, nodes, config_name=str(config or "deploy/serve_cpu.yaml"), local=address is None
            ):
                typer.echo(f"warning: {warning}", err=True)
        except PlacementError as exc:
            typer.echo(f"vessa serve: {exc}", err=True)
            raise typer.Exit(2) from None

    if address is None:  # a local Ray gets this machine's CPUs (or --num-cpus) and GPUs: check before starting it
        _check([local_resources(num_cpus)])
    _handle_signals()
    served = False
    try:
        ray.init(
            # "local": a new instance even when `ray start` left an address behind for `ray.init()`
            address=address or "local",
            num_cpus=num_cpus if address is None else None,
            include_dashboard=False,
            ignore_reinit_error=True,
        )
        _handle_signals()  # ray.init installs its own SIGTERM handler (a C++ stack trace on exit): ours again
        if stop["now"]:
            return
        if address is not None:
            _check([n["Resources"] for n in ray.nodes() if n.get("Alive")])
        serve.start(http_options=http)
        # Deploy without Serve's own wait (which neither Ctrl-C nor SIGTERM ends cleanly), then wait here.
        serve.run_many(
            [serve.RunTarget(build_app(args, deployments), name="vessa", route_prefix="/")],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
        if not _wait_running(stop):
            return
        served = True
        url = f"http://{http['host']}:{http['port']}"
        typer.echo(f"VESSA is serving at {url}  (OpenAPI: {url}/docs)")
        if stream:
            gcs = ray.get_runtime_context().gcs_address
            env = dict(os.environ, VESSA_REDIS_URL=args["redis_url"])
            dispatcher = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "dispatcher", "--ray-address", gcs], env=env
            )
            typer.echo(f"Redis path: {args['redis_url']} (dispatcher pid {dispatcher.pid})")
        while not stop["now"]:
            time.sleep(0.5)
            if dispatcher is not None and dispatcher.poll() is not None:
                typer.echo(f"dispatcher exited with {dispatcher.returncode}; restarting it")
                dispatcher = subprocess.Popen(dispatcher.args, env=env)
    except KeyboardInterrupt:  # Ctrl-C before our handler was in place (inside ray.init)
        pass
    finally:
        typer.echo("shutting down" if served else "stopping before the application was ready", err=not served)
        if dispatcher is not None and dispatcher.poll() is None:
            dispatcher.terminate()
            try:
                dispatcher.wait(30)
            except subprocess.TimeoutExpired:  # stuck, e.g. connecting to a Ray that is already gone
                dispatcher.kill()
                dispatcher.wait(10)
        if ray.is_initialized():
            if served or address is not None:
                with contextlib.suppress(Exception):
                    serve.shutdown()
            ray.shutdown()
        if redis_server is not None:
            redis_server.stop()


def local_resources(num_cpus: int | None) -> dict[str, float]:
    """What a local Ray instance started here will have: Ray's own count of CPUs and NVIDIA GPUs."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
    try:
        gpus = NvidiaGPUAcceleratorManager.get_current_node_num_accelerators()
        visible = NvidiaGPUAcceleratorManager.get_current_process_visible_accelerator_ids()
        if visible is not None:
            gpus = min(gpus, len(visible))
    except Exception:
        gpus = 0
    return {"CPU": float(cpus), "GPU": float(gpus)}


def _wait_running(stop: dict, report_every_s: float = 30.0) -> bool:
    """Wait until the application runs (True) or a stop signal arrives (False); a failed deployment
    exits with status 1 and Serve's message. Says what it waits for every `report_every_s`."""
    from ray import serve

    typer.echo("waiting for the VESSA application to start (Ctrl-C stops)", err=True)
    last = time.monotonic()
    while not stop["now"]:
        app = serve.status().applications.get("vessa")
        status = str(getattr(app.status, "value", app.status)) if app else "NOT_STARTED"
        if status == "RUNNING":
            return True
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            typer.echo(f"vessa serve: the application failed to deploy: {app.message}", err=True)
            raise typer.Exit(1)
        if time.monotonic() - last >= report_every_s:
            states = {
                name: dict(d.replica_states) for name, d in (app.deployments.items() if app else [])
            }
            typer.echo(f"still waiting: {status}, replicas {states}", err=True)
            last = time.monotonic()
        time.sleep(0.25)
    return False


def dispatcher_cmd(
    redis_url: str | None = typer.Option(None, "--redis-url", help="default: VESSA_REDIS_URL"),
    ray_address: str = typer.Option("auto", "--ray-address", help="the Ray cluster running the Serve app"),
    app_name: str = typer.Option("vessa", help="Serve application name"),
    consumer: str | None = typer.Option(None, help="consumer name in the group (default host-pid)"),
    max_inflight: int | None = typer.Option(None, help="calls in flight to the assistant"),
    bulk_max_inflight: int | None = typer.Option(
        None, help="of those, labeling-job calls (the bulk lane, read only when trainers wait for nothing)"
    ),
    claim_idle_ms: int | None = typer.Option(
        None, help="reclaim entries pending on a dead consumer after this"
    ),
    max_attempts: int | None = typer.Option(None, help="deliveries before a request is dead-lettered"),
    call_timeout_s: float | None = typer.Option(None, help="seconds a call may take at the replicas (default 120) ..."),
    call_timeout_per_slice_s: float | None = typer.Option(
        None, help="... plus this for every slice in flight there, the call's own included (default 10)"
    ),
):
    """Move requests from the Redis stream to the assistant (DeploymentHandle) and results back."""
    from services.dispatch.dispatcher import DispatcherSettings
    from services.dispatch.launch import run_dispatcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {
        "redis_url": redis_url,
        "ray_address": ray_address,
        "app_name": app_name,
        "consumer": consumer,
        "max_inflight": max_inflight,
        "bulk_max_inflight": bulk_max_inflight,
        "claim_idle_ms": claim_idle_ms,
        "max_attempts": max_attempts,
        "call_timeout_s": call_timeout_s,
        "call_timeout_per_slice_s": call_timeout_per_slice_s,
    }
    settings = DispatcherSettings(**{k: v for k, v in overrides.items() if v is not None})
    d = asyncio.run(run_dispatcher(settings))
    typer.echo(f"dispatcher stopped: {d.counters}")
    # Every entry is acknowledged or left pending for another dispatcher; the Serve handle's router
    # threads would keep the interpreter alive, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def redis_cmd(
    run_dir: Path = typer.Option(Path("runs/redis"), help="directory for the AOF and the log"),
    port: int | None = typer.Option(None, help="port (default: a free one)"),
    maxmemory: str | None = typer.Option(None, help="e.g. 512mb (noeviction: a full Redis refuses writes)"),
    password: str | None = typer.Option(None, envvar="VESSA_REDIS_PASSWORD"),
):
    """Run the embedded Redis in the foreground (prints its URL)."""
    from services.runtime.redis_server import EmbeddedRedis

    server = EmbeddedRedis(run_dir, port=port, password=password, maxmemory=maxmemory).start()
    typer.echo(f"VESSA_REDIS_URL={server.url}")
    try:
        while server.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()

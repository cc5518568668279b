"""The embedded default for `vessa label` with no running service: local Ray Serve with the given
assistant, an embedded Redis and a dispatcher process, all stopped afterwards (as `vessa demo` does).

It never serves untrained parts unless asked for by name: a checkpoint path is required, or the
literal `random` / `pretrained` (LiteMedSAM with untrained VESSA parts)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def embedded_service(
    ckpt: str,
    bank: Path,
    run_dir: Path,
    encoder: str = "litemedsam",
    device: str = "cpu",
    replicas: int = 1,
    embed_store: Path | None = None,
    engine: str = "auto",
    engine_precision: str = "f32",
    inference: dict | None = None,
    keep_freed_memory: bool = True,
    decoder_precision: str | None = None,
):
    """Yields the Redis URL of a local service that answers the request stream. embed_store: a
    directory of persisted encoder embeddings the replica reads and fills (`vessa assistant embed`);
    engine, engine_precision: the replica's encoder and decoder runtime (assistant_server/engines);
    inference: InferenceOptions overrides for the replica (e.g. refine_below); keep_freed_memory: the
    replica serves this job alone, so it keeps freed memory for reuse (assistant_server/cpu_memory.py);
    decoder_precision: the decoder engine's own precision (default: engine_precision)."""
    if ckpt not in ("random", "pretrained") and not Path(ckpt).is_file():
        raise FileNotFoundError(f"assistant checkpoint not found: {ckpt}")
    if not (Path(bank) / "manifest.json").is_file():
        raise FileNotFoundError(f"no template bank at {bank} (manifest.json missing)")
    import ray
    from ray import serve

    from services.ingress.app import all_cores_runtime_env, build_app
    from services.runtime.redis_server import EmbeddedRedis, free_port

    run_dir.mkdir(parents=True, exist_ok=True)
    redis_server = dispatcher = None
    # Ray's and Serve's start-up chatter is not the user's business; warnings and errors still show
    ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, logging_level=logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        cores = os.cpu_count() or 1
        assistant = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0, "runtime_env": all_cores_runtime_env()}}
        if device == "cpu":
            assistant["user_config"] = {"torch_threads": max(1, cores // replicas)}
        args = {"ckpt": str(ckpt), "bank": str(bank), "encoder": encoder, "device": device, "max_batch_slices": 16, "engine": engine, "engine_precision": engine_precision, "keep_freed_memory": keep_freed_memory}
        if decoder_precision:
            args["decoder_precision"] = decoder_precision
        if inference:
            args["inference"] = dict(inference)
        if embed_store is not None:
            args["cache_store"] = str(embed_store)
        serve.run(
            build_app(
                args,
                {"VessaAssistant": assistant, "VessaIngress": {"ray_actor_options": {"num_cpus": 0}}},
            ),
            name="vessa",
            route_prefix="/",
        )
        redis_server = EmbeddedRedis(run_dir / "redis").start()
        log = open(run_dir / "dispatcher.log", "ab")
        dispatcher = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "dispatcher", "--redis-url", redis_server.url, "--ray-address", ray.get_runtime_context().gcs_address],
            stdout=log,
            stderr=subprocess.STDOUT,
            # a cold CPU batch of LiteMedSAM slices can take minutes: a call is not failed for that
            env=dict(os.environ, VESSA_REDIS_URL=redis_server.url, VESSA_CALL_TIMEOUT_S=os.environ.get("VESSA_CALL_TIMEOUT_S", "3600")),
        )
        yield redis_server.url
    finally:
        if dispatcher is not None and dispatcher.poll() is None:
            dispatcher.terminate()
            try:
                dispatcher.wait(30)
            except subprocess.TimeoutExpired:
                dispatcher.kill()
        ray.shutdown()  # stops every Serve actor of this local instance (see services/demo/pipeline.py)
        if redis_server is not None:
            redis_server.stop()

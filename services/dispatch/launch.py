"""Starting a dispatcher: a caller for the Serve application (waiting until it exists), the dispatcher
process's main loop (`vessa dispatcher`), and the dispatcher as a Ray actor placed on any node."""

from __future__ import annotations

import asyncio
import logging
import signal

from services.dispatch.dispatcher import AssistantCaller, Dispatcher, DispatcherSettings
from shared.wire.connection import check_credentials

log = logging.getLogger("vessa.dispatcher")


def serve_handle_caller(app_name: str = "vessa", deployment: str = "VessaAssistant") -> AssistantCaller:
    """Calls `VessaAssistant.assist` through a DeploymentHandle (the process must be a Ray driver)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app_name)

    async def call(meta: bytes, blobs: list[bytes]) -> tuple[bytes, list[bytes]]:
        return await handle.assist.remote(meta, blobs)

    return call


async def wait_for_serve_app(
    app_name: str, deployment: str, stop: asyncio.Event | None = None
) -> AssistantCaller | None:
    """Wait (with backoff) until the Serve application exists, then return a caller for it: a
    dispatcher may start before the assistant is deployed (docker compose, restarts)."""
    backoff = 0.5
    while True:
        try:
            return serve_handle_caller(app_name, deployment)
        except Exception as exc:  # no Serve instance / application yet
            if stop is not None and stop.is_set():
                return None
            log.info("waiting for Serve application %r (%s)", app_name, type(exc).__name__)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 10.0)


async def run_dispatcher(settings: DispatcherSettings, caller: AssistantCaller | None = None) -> Dispatcher:
    """Run until SIGINT/SIGTERM; connects to Ray and the Serve app unless a caller is given."""
    await check_credentials(settings.redis_url)  # before Ray: a wrong password fails fast and clean
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if caller is None:
        import ray

        ray.init(address=settings.ray_address, ignore_reinit_error=True, log_to_driver=False)
        for sig in (signal.SIGINT, signal.SIGTERM):  # ray.init installs its own handlers: ours again
            loop.add_signal_handler(sig, stop.set)
        caller = await wait_for_serve_app(settings.app_name, settings.deployment, stop)
    d = Dispatcher(settings, caller)  # type: ignore[arg-type]
    if caller is None:  # stopped before the assistant appeared
        return d
    d._stop = stop
    log.info(
        "dispatcher %s reading %s as group %s", settings.consumer, settings.request_stream, settings.group
    )
    await d.run()
    return d


class DispatcherActor:
    """The dispatcher as a Ray actor, so it can live on any node of the cluster (place it with
    `ray.remote(DispatcherActor).options(num_cpus=0, resources={...})`). Several, on different nodes,
    share the stream as one consumer group: when a node dies, the entries its dispatcher held stay
    pending and another dispatcher reclaims them after `claim_idle_ms`."""

    def __init__(self, settings: dict):
        self.settings = DispatcherSettings(**settings)
        self._d: Dispatcher | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> str:
        """Wait for the Serve application, start reading; returns the consumer name."""
        caller = await wait_for_serve_app(self.settings.app_name, self.settings.deployment)
        self._d = Dispatcher(self.settings, caller)  # type: ignore[arg-type]
        self._task = asyncio.create_task(self._d.run())
        return self.settings.consumer

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def counters(self) -> dict:
        return dict(self._d.counters) if self._d else {}

    async def stop(self) -> dict:
        """Finish calls in flight (up to `shutdown_grace_s`), leave the rest pending; the counters."""
        if self._d is not None and self._task is not None:
            self._d.stop()
            await self._task
        return self.counters()

"""The ingress's per-app state (on `app.state.vessa`) and the dependency that hands it to the routes.

One `IngressState` per app: its settings, the handle to the assistant deployment, the metrics, the Redis
client of the job routes and how a job's runner is started. Routes take it with
`state: IngressState = Depends(get_state)`; nothing lives in module globals, so two apps in one
process (tests, benchmarks) never share a handle, a counter or a setting.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from fastapi import Request

from services.ingress.errors import bad
from services.ingress.metrics import IngressMetrics
from services.ingress.settings import ApiSettings


def launch_job_actor(job_id: str, redis_url: str) -> None:
    """The default job launcher: the job's runner actor, wherever Ray places it (never in the ingress)."""
    from services.labeling.job_actor import launch

    launch(job_id, redis_url)


class VolumeCache:
    """The last few cases' images and labels, so that scrolling through slices reads each file once."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


@dataclass
class IngressState:
    settings: ApiSettings = field(default_factory=ApiSettings)
    handle: Any = None  # ray.serve.handle.DeploymentHandle to VessaAssistant, None until connected
    launch_job: Callable[[str, str], None] = launch_job_actor
    metrics: IngressMetrics = field(default_factory=IngressMetrics)
    volumes: VolumeCache = field(default_factory=VolumeCache)
    _classes: list[dict] | None = None
    _redis: redis.Redis | None = None

    # -- the assistant ----------------------------------------------------------------------------
    def assistant(self):
        if self.handle is None:
            raise bad("the API is not connected to an assistant yet", 503)
        return self.handle

    def timeout_for(self, slices: int) -> float:
        """The time limit of a call with `slices` slices: the base limit plus a share per slice."""
        return self.settings.request_timeout_s + self.settings.request_timeout_per_slice_s * max(slices, 0)

    async def call(self, method: str, *args, timeout: float | None = None, **kwargs):
        """A method of the assistant deployment, within `timeout` (default `request_timeout_s`; a 504
        after it), backpressure as 503."""
        timeout = self.settings.request_timeout_s if timeout is None else timeout
        try:
            return await asyncio.wait_for(getattr(self.assistant(), method).remote(*args, **kwargs), timeout)
        except TimeoutError:
            raise bad(f"the assistant did not answer within {timeout} s", 504) from None
        except Exception as exc:
            if type(exc).__name__ == "BackPressureError":
                raise bad("the assistant is at capacity; retry later", 503) from None
            raise

    async def classes(self, timeout: float | None = None) -> list[dict]:
        """The served class table, asked once and kept until the bank changes (`forget_classes`); within
        `timeout` (the calling route's own limit, so a cold replica's first answer is not held to less)."""
        if self._classes is None:
            self._classes = (await self.call("templates", timeout=timeout))["classes"]
        return self._classes

    def forget_classes(self) -> None:
        self._classes = None

    # -- labeling jobs ------------------------------------------------------------------------------
    @property
    def jobs_enabled(self) -> bool:
        return bool(self.settings.redis_url and self.settings.data_root)

    def redis(self) -> redis.Redis:
        """The job routes' Redis client (one pooled client, not a connection per request); a service
        without jobs answers as if the routes were not there (404), not with a server error."""
        if not self.jobs_enabled:
            raise bad(
                "labeling jobs are off on this service: it needs a data_root (VESSA_DATA_ROOT) and the "
                "Redis path (redis_url, `vessa serve --stream`)",
                404,
            )
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5)
        return self._redis


def get_state(request: Request) -> IngressState:
    return request.app.state.vessa

"""Serve autoscaling from the Redis backlog: a custom policy (`autoscaling_config.policy`) for VessaAssistant.

Serve's own autoscaler counts only calls that reached a DeploymentHandle. On the Redis path those are
the dispatchers' calls in flight, which each dispatcher caps (`max_inflight`), so a queue of thousands
of requests looks to Serve like `max_inflight` ongoing calls and never asks for more replicas. This
policy also reads the request stream's backlog — entries not yet delivered to the consumer group
(`lag`) plus entries delivered but not acknowledged (`pending`) — and asks for
`max(ongoing / target_ongoing_requests, backlog / backlog_per_replica)` replicas. Serve applies the
config's `min_replicas`/`max_replicas` and `upscale_delay_s`/`downscale_delay_s` to that number.

The policy runs inside the Serve controller and is called every control-loop tick (0.1 s), so it never
touches the network there: a daemon thread polls Redis every `poll_interval_s` and the policy reads the
last figure. A figure older than `stale_after_s` (Redis unreachable) is ignored and the policy falls
back to Serve's ongoing-requests rule alone.

Redis: the `redis_url` kwarg (only for a password-less URL: Serve logs policy kwargs), else
`VESSA_REDIS_URL` in the controller's environment (the Ray head's).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from typing import Any

from shared.wire.messages import BULK_STREAM, GROUP, REQUEST_STREAM

log = logging.getLogger("vessa.autoscaling")


def stream_backlog(client, stream: str = REQUEST_STREAM, group: str = GROUP) -> int:
    """Entries of `stream` the group has not acknowledged: never delivered (lag) + pending.

    Redis reports `lag` as nil when it cannot tell (entries deleted in the middle of the stream); then
    the stream length is used, an upper bound (acknowledged entries stay until the next trim)."""
    if not client.exists(stream):
        return 0
    for g in client.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            lag = g.get("lag")
            if lag is None:
                return int(client.xlen(stream))
            return int(lag) + int(g["pending"])
    return int(client.xlen(stream))  # no group yet: nothing was read


class _BacklogReading:
    """Shared between the policy and its poller thread; the thread holds no reference to the policy,
    so a redeployed policy is collected and its thread stops."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.value: int | None = None
        self.at = 0.0


def _poll(reading: _BacklogReading, url: str, stream: str, group: str, interval_s: float) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    warned = False
    while not reading.stop.is_set():
        try:
            # the labeling jobs' lane counts too: a large job is a reason for more replicas
            value = stream_backlog(client, stream, group) + stream_backlog(client, BULK_STREAM, group)
            with reading.lock:
                reading.value, reading.at = value, time.monotonic()
            warned = False
        except Exception as exc:  # Redis down or not yet up: the policy falls back, we keep trying
            if not warned:
                log.warning("backlog autoscaling: cannot read %s (%s)", stream, exc)
                warned = True
        reading.stop.wait(interval_s)
    client.close()


class BacklogPolicy:
    """`autoscaling_config: {policy: {policy_function: services.dispatch.autoscaling:BacklogPolicy,
    policy_kwargs: {backlog_per_replica: 64}}}`; see the module docstring."""

    def __init__(
        self,
        backlog_per_replica: float = 64,
        redis_url: str | None = None,
        request_stream: str = REQUEST_STREAM,
        group: str = GROUP,
        poll_interval_s: float = 1.0,
        stale_after_s: float = 10.0,
    ):
        if backlog_per_replica <= 0:
            raise ValueError("backlog_per_replica must be positive")
        self.backlog_per_replica = float(backlog_per_replica)
        self.stale_after_s = stale_after_s
        self.url = redis_url or os.environ.get("VESSA_REDIS_URL")
        self._reading = _BacklogReading()
        if self.url:
            thread = threading.Thread(
                target=_poll,
                args=(self._reading, self.url, request_stream, group, poll_interval_s),
                name="vessa-backlog-poller",
                daemon=True,
            )
            thread.start()
            weakref.finalize(self, self._reading.stop.set)
        else:
            log.warning("backlog autoscaling: no redis_url and no VESSA_REDIS_URL; ongoing requests only")

    def backlog(self) -> int | None:
        with self._reading.lock:
            if self._reading.value is None or time.monotonic() - self._reading.at > self.stale_after_s:
                return None
            return self._reading.value

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        return decide(ctx, self.backlog(), self.backlog_per_replica)


def decide(ctx, backlog: int | None, backlog_per_replica: float) -> tuple[float, dict[str, Any]]:
    """Replicas wanted: Serve's ongoing-requests rule, raised to what the backlog needs."""
    if ctx.current_num_replicas == 0 and not backlog:
        return ctx.target_num_replicas, {"backlog": backlog}
    target = ctx.config.get_target_ongoing_requests()
    from_ongoing = ctx.total_num_requests / target if target else 0.0
    from_backlog = math.ceil(backlog / backlog_per_replica) if backlog else 0
    return max(from_ongoing, float(from_backlog)), {"backlog": backlog}

"""The ingress's Prometheus metrics: one registry per app, so two apps in a process never share counts."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# every route label the metrics know; any other path counts as "other", so that a client cannot grow
# the label set (and memory) without end
KNOWN_ROUTES = {
    "/v1/pseudo-labels",
    "/v1/segment",
    "/v1/templates",
    "/v1/templates/{id}",
    "/v1/info",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/jobs",
    "/v1/jobs/{id}",
}


def route_label(path: str) -> str:
    route = path if path.startswith(("/v1/", "/healthz", "/readyz", "/metrics")) else "other"
    if route.startswith("/v1/templates/"):
        route = "/v1/templates/{id}"
    if route.startswith("/v1/jobs/"):
        route = "/v1/jobs/{id}"
    return route if route in KNOWN_ROUTES else "other"


class IngressMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vessa_http_requests_total", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram(
            "vessa_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.slices = Counter("vessa_http_slices_total", "slices pseudo-labeled over REST", registry=r)
        self.rate = Gauge("vessa_slices_per_second", "slices per second over the last minute (REST)", registry=r)
        self.queue = Gauge("vessa_request_stream_depth", "entries in the Redis request stream", registry=r)
        self.pending = Gauge("vessa_request_stream_pending", "entries delivered but not acknowledged", registry=r)
        self.bulk = Gauge("vessa_bulk_stream_depth", "entries in the labeling jobs' stream (the bulk lane)", registry=r)
        self.batch = Gauge(
            "vessa_replica_batch_count", "assistant batches by size (one replica's view)", ["size"], registry=r
        )
        self._recent: deque[tuple[float, int]] = deque()

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = route_label(path)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def count_slices(self, n: int) -> None:
        self.slices.inc(n)
        now = time.time()
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 60:
            self._recent.popleft()

    def render(self) -> bytes:
        now = time.time()
        self.rate.set(sum(n for t, n in self._recent if t >= now - 60) / 60.0)
        return generate_latest(self.registry)

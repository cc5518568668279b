"""The service itself: `/v1/info`, liveness `/healthz`, readiness `/readyz`, Prometheus `/metrics`."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from services.ingress.errors import CALL_ERRORS, CALL_TEXT, error_responses
from services.ingress.metrics import IngressMetrics
from services.ingress.settings import ApiSettings
from services.ingress.state import IngressState, get_state
from shared.wire.messages import BULK_STREAM

router = APIRouter()


@router.get(
    "/v1/info",
    summary="Model, bank version, classes, device and replica",
    responses=error_responses(CALL_TEXT, *CALL_ERRORS),
)
async def get_info(state: IngressState = Depends(get_state)):
    replica = await state.call("info")
    return {"service": "vessa", "api_version": "v1", **replica}


@router.get("/healthz", summary="Liveness")
async def healthz():
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: a warmed-up assistant replica answered",
    responses={
        503: {
            "description": "Not ready (no replica answered, or still warming up)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def readyz(state: IngressState = Depends(get_state)):
    try:
        replica = await asyncio.wait_for(state.assistant().info.remote(), 10)
    except Exception as exc:
        return JSONResponse(
            status_code=503, content={"status": "not ready", "detail": f"{type(exc).__name__}"}
        )
    if not replica.get("ready"):
        return JSONResponse(status_code=503, content={"status": "warming up"})
    return {"status": "ready", "bank_version": replica["bank_version"], "model": replica["model"]}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses=error_responses(CALL_TEXT, 401, ok="text/plain"),
)
async def get_metrics(state: IngressState = Depends(get_state)):
    metrics = state.metrics
    try:
        replica = await asyncio.wait_for(state.assistant().info.remote(), 5)
        for size, count in replica.get("batch_size_histogram", {}).items():
            metrics.batch.labels(size).set(count)
    except Exception:
        pass
    if state.settings.redis_url:
        await asyncio.to_thread(_queue_depth, state.settings, metrics)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")


def _queue_depth(settings: ApiSettings, metrics: IngressMetrics) -> None:
    try:
        import redis

        r = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        metrics.queue.set(r.xlen(settings.request_stream))
        metrics.bulk.set(r.xlen(BULK_STREAM))
        groups = r.xinfo_groups(settings.request_stream)
        metrics.pending.set(sum(g["pending"] for g in groups))
    except Exception:
        pass

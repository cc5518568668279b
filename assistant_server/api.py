"""The REST API: a FastAPI ingress deployment in front of the `VessaAssistant` replicas.

Routes (OpenAPI at /docs):
  POST   /v1/pseudo-labels      a NIfTI volume or a .npy batch of slices → label map (same format) + confidence
  POST   /v1/segment            one image + explicit prompts (points, box, mask) + a class → mask + confidence
  GET    /v1/templates          the template bank: version, classes, exemplars
  POST   /v1/templates          add a labeled exemplar (image + label + class table)
  DELETE /v1/templates/{id}     remove an exemplar
  GET    /v1/info               model, bank version, classes, device, replica, counters
  POST/GET/DELETE /v1/jobs…     labeling jobs over a dataset under data_root (assistant_server/routes/jobs.py)
  GET    /healthz, /readyz      liveness; readiness (a warmed-up replica answered)
  GET    /metrics               Prometheus text format

Responses that carry an array are `multipart/mixed`: first a JSON part (confidence, versions, shape),
then the array as a file part (`.nii.gz`, `.nii` or `.npy`, like the input). Every input error is a 4xx
whose `detail` names the problem; with `VESSA_API_TOKEN` set, every route but /healthz and /readyz
needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Receive, Scope, Send

from assistant_server.routes import jobs as jobs_routes
from assistant_server.routes import review as review_routes
from assistant_server.routes import ui as ui_routes
from assistant_server.volume_io import UploadedVolume, VolumeError, read_upload, write_like
from shared.config import VessaSettings
from shared.protocol import AssistReply, Limits, encode_call, probabilities
from shared.wire import WireError, check_finite, decode_array, read_npy, write_npy

OPEN_PATHS = {"/healthz", "/readyz", *ui_routes.OPEN_PATHS}  # the page is only the login form without a token


class ApiSettings(VessaSettings):
    """Ingress settings (Serve application args or `VESSA_` env vars)."""

    api_token: str | None = None
    max_upload_mb: float = 256.0
    request_timeout_s: float = 120.0
    redis_url: str | None = None  # when set, /metrics reports the request stream's depth
    request_stream: str = "vessa:requests"
    limits: Limits = Limits()
    data_root: str | None = None  # labeling jobs read datasets only under this directory (None: jobs off)
    job_output_root: str | None = None  # where jobs write (default <data_root>/vessa-labels)
    job_runner: str = "services.labeling.job_actor:launch"  # starts a job's runner actor


# ---------------------------------------------------------------------------------------------- ASGI guards
class GuardMiddleware:
    """Bearer-token check (constant-time) and a request body limit (413), before any parsing."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = RUNTIME.settings.api_token.encode() if RUNTIME.settings.api_token else None
        max_bytes = int(RUNTIME.settings.max_upload_mb * 1024 * 1024)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if token is not None and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            given = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, token):
                return await _send_json(
                    send, 401, {"detail": "missing or invalid bearer token"}, {"www-authenticate": "Bearer"}
                )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > max_bytes
            except ValueError:
                return await _send_json(send, 400, {"detail": "invalid Content-Length header"})
            if too_big:
                return await _send_json(
                    send, 413, {"detail": f"request body over the limit of {max_bytes} bytes"}
                )
        seen = 0
        overflow = False
        app_started = replaced = False
        too_large = {"detail": f"request body over the limit of {max_bytes} bytes"}

        async def limited_receive():
            nonlocal seen, overflow
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    overflow = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            # FastAPI turns any error while reading a form, ours included, into "400 There was an error
            # parsing the body": once the body overflowed, answer 413 instead of what the app says.
            nonlocal app_started, replaced
            if overflow and not app_started:
                if not replaced:
                    replaced = True
                    await _send_json(send, 413, too_large)
                return
            app_started = app_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not (app_started or replaced):
                await _send_json(send, 413, too_large)


class _BodyTooLarge(Exception):
    pass


async def _send_json(send: Send, status: int, body: dict, extra: dict | None = None) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------------------------------------- responses
def multipart_response(
    meta: dict, payload: bytes, filename: str, media_type: str, headers: dict | None = None
) -> Response:
    """multipart/mixed: a JSON part, then the array file part."""
    boundary = "vessa-" + secrets.token_hex(12)
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Type: application/json\r\nContent-Disposition: inline; name="meta"\r\n\r\n'.encode(),
            json.dumps(meta).encode(),
            f'\r\n--{boundary}\r\nContent-Type: {media_type}\r\nContent-Disposition: attachment; name="result"; '
            f'filename="{filename}"\r\n\r\n'.encode(),
            payload,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    return Response(content=body, media_type=f"multipart/mixed; boundary={boundary}", headers=headers)


# ---------------------------------------------------------------------------------------------- OpenAPI
class ErrorDetail(BaseModel):
    detail: str


_ERROR_TEXT = {
    400: "Bad input; `detail` says what is wrong",
    401: "Missing or invalid bearer token (when VESSA_API_TOKEN is set)",
    404: "No such exemplar",
    409: "A pinned bank version that no longer exists, or a duplicate exemplar",
    413: "Request body over max_upload_mb",
    503: "The assistant is at capacity (backpressure) or not connected: retry later",
    504: "The assistant did not answer within request_timeout_s",
}


def _responses(*codes: int, ok: str | None = None) -> dict:
    """OpenAPI `responses` for a route: its error statuses (all `{"detail": ...}`), and for `ok` the
    media type of a 200 that is not JSON."""
    out: dict = {c: {"model": ErrorDetail, "description": _ERROR_TEXT[c]} for c in codes}
    if ok is not None:
        out[200] = {"content": {ok: {"schema": {"type": "string", "format": "binary"}}}}
    return out


_CALL_ERRORS = (401, 503, 504)  # any route that calls the assistant
_ARRAY = "multipart/mixed"


def _bad(message: str, status: int = 400) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _class_ids(spec: str | None, classes: list[dict]) -> list[int] | None:
    """'LV,RV' or '3,1' → class indices; unknown names are a 400."""
    if spec is None or not spec.strip():
        return None
    ids = []
    by_name = {c["name"].lower(): c["index"] for c in classes}
    valid = {c["index"] for c in classes if c["index"] != 0}
    for token in spec.split(","):
        token = token.strip()
        # ASCII digits only: str.isdigit() accepts '²', which int() then refuses (a 500)
        if re.fullmatch(r"-?[0-9]{1,6}", token) and int(token) in valid:
            ids.append(int(token))
        elif token.lower() in by_name and by_name[token.lower()] != 0:
            ids.append(by_name[token.lower()])
        else:
            raise _bad(
                f"unknown class {token!r}: known classes are {[c['name'] for c in classes if c['index'] != 0]}"
            )
    return ids


# ---------------------------------------------------------------------------------------------- app
class _Runtime:
    """Per-process state of an ingress replica: its settings and the handle to the assistant."""

    def __init__(self) -> None:
        self.settings = ApiSettings()
        self.handle: DeploymentHandle | None = None
        self.classes: list[dict] | None = None

    def configure(self, handle: DeploymentHandle, settings: ApiSettings) -> None:
        self.handle, self.settings, self.classes = handle, settings, None


RUNTIME = _Runtime()

app = FastAPI(
    title="VESSA",
    version="0.1.0",
    description="Pseudo-labels for semi-supervised medical image segmentation, from a reference-guided "
    "foundation model. Array responses are multipart/mixed: a JSON part, then the file.",
    # an API answers for the paths it documents: no 307 to another route (DELETE /v1/templates/%2F would
    # otherwise be redirected to /v1/templates), so an unknown path is a plain 404
    redirect_slashes=False,
)
app.add_middleware(GuardMiddleware)
app.include_router(jobs_routes.router)
app.include_router(review_routes.router)
app.include_router(ui_routes.router)

registry = CollectorRegistry()
m_requests = Counter("vessa_http_requests_total", "HTTP requests", ["route", "status"], registry=registry)
m_latency = Histogram(
    "vessa_http_request_seconds",
    "HTTP request latency",
    ["route"],
    registry=registry,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
m_slices = Counter("vessa_http_slices_total", "slices pseudo-labeled over REST", registry=registry)
m_rate = Gauge("vessa_slices_per_second", "slices per second over the last minute (REST)", registry=registry)
m_queue = Gauge("vessa_request_stream_depth", "entries in the Redis request stream", registry=registry)
m_pending = Gauge("vessa_request_stream_pending", "entries delivered but not acknowledged", registry=registry)
m_bulk = Gauge("vessa_bulk_stream_depth", "entries in the labeling jobs' stream (the bulk lane)", registry=registry)
m_batch = Gauge(
    "vessa_replica_batch_count", "assistant batches by size (one replica's view)", ["size"], registry=registry
)
recent: list[tuple[float, int]] = []


def handle() -> DeploymentHandle:
    if RUNTIME.handle is None:
        raise _bad("the API is not connected to an assistant yet", 503)
    return RUNTIME.handle


async def call(method: str, *args, **kwargs):
    try:
        return await asyncio.wait_for(
            getattr(handle(), method).remote(*args, **kwargs), RUNTIME.settings.request_timeout_s
        )
    except TimeoutError:
        raise _bad(
            f"the assistant did not answer within {RUNTIME.settings.request_timeout_s} s", 504
        ) from None
    except Exception as exc:
        if type(exc).__name__ == "BackPressureError":
            raise _bad("the assistant is at capacity; retry later", 503) from None
        raise


async def classes() -> list[dict]:
    if RUNTIME.classes is None:
        RUNTIME.classes = (await call("templates"))["classes"]
    return RUNTIME.classes


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


@app.middleware("http")
async def observe(request: Request, call_next):
    t0 = time.perf_counter()
    route = (
        request.url.path
        if request.url.path.startswith(("/v1/", "/healthz", "/readyz", "/metrics"))
        else "other"
    )
    if route.startswith("/v1/templates/"):
        route = "/v1/templates/{id}"
    if route.startswith("/v1/jobs/"):
        route = "/v1/jobs/{id}"
    if route not in KNOWN_ROUTES:  # a label per unknown path would let any client grow memory without end
        route = "other"
    response = await call_next(request)
    m_requests.labels(route, str(response.status_code)).inc()
    m_latency.labels(route).observe(time.perf_counter() - t0)
    return response


@app.exception_handler(WireError)
async def wire_error(_: Request, exc: WireError):
    return JSONResponse(status_code=400, content={"detail": str(exc)})


@app.exception_handler(VolumeError)
async def volume_error(_: Request, exc: VolumeError):
    return JSONResponse(status_code=400, content={"detail": str(exc)})


# ------------------------------------------------------------------------------------------ routes
@app.post(
    "/v1/pseudo-labels",
    summary="Pseudo-label a NIfTI volume or a .npy batch of 2D slices",
    response_class=Response,
    responses=_responses(400, 409, 413, *_CALL_ERRORS, ok=_ARRAY),
)
async def pseudo_labels(
    file: UploadFile = File(..., description=".nii, .nii.gz (a volume) or .npy ((B, H, W) or (H, W) slices)"),
    probs: UploadFile | None = File(
        None,
        description="student probabilities: .npy (B, C, H, W) or NIfTI 4D (X, Y, Z, C); float in [0, 1] or uint8 p·255",
    ),
    classes_: str | None = Form(
        None, alias="classes", description="class subset, names or indices, comma-separated"
    ),
    axis: int | None = Form(None, description="through-plane axis of a volume (default: largest spacing)"),
    return_probs: bool = Form(
        False, description=".npy input only: also return (B, C, H, W) uint8 probabilities"
    ),
):
    upload = read_upload(await file.read(), file.filename or "", axis, RUNTIME.settings.limits)
    ids = _class_ids(classes_, await classes())
    prob_slices = None
    if probs is not None:
        prob_slices = _read_probs(await probs.read(), probs.filename or "", upload, RUNTIME.settings.limits)
    meta, blobs = encode_call(
        list(upload.slices),
        probs=prob_slices,
        class_ids=ids,
        return_probs=return_probs and upload.kind == "npy",
        volume=upload.kind != "npy",  # a NIfTI volume is one piece; a .npy batch is independent slices
    )
    reply_meta, reply_blobs = await call("assist", meta.model_dump_json(), blobs)
    reply = AssistReply.model_validate_json(reply_meta)
    if reply.status == "error":
        raise _bad(
            reply.error or "assistant error",
            409 if reply.error_kind == "bank_version" else (500 if reply.error_kind == "internal" else 400),
        )
    labels = np.stack([decode_array(s.label, reply_blobs) for s in reply.slices])
    n = len(reply.slices)
    m_slices.inc(n)
    now = time.time()
    recent.append((now, n))
    while recent and recent[0][0] < now - 60:
        recent.pop(0)
    info = {
        "shape": list(upload.original_shape),
        "slices": n,
        "axis": upload.axis,
        "classes": {str(c["index"]): c["name"] for c in await classes()},
        "confidence": [s.confidence for s in reply.slices],
        "confidence_layout": "per slice along the through-plane axis, per class index (background first); null = class not requested",
        "model_version": reply.model_version,
        "bank_version": reply.bank_version,
        "timing": reply.timing,
    }
    headers = {"X-VESSA-Bank-Version": str(reply.bank_version), "X-VESSA-Model": reply.model_version}
    if upload.kind == "npy":
        if return_probs:
            p = np.stack([decode_array(s.probs, reply_blobs) for s in reply.slices])
            payload = write_npy(np.concatenate([labels[:, None], p], axis=1))
            info["layout"] = "(B, 1 + C, H, W) uint8: channel 0 the label map, then probabilities p·255"
        else:
            payload = write_npy(labels.reshape(upload.original_shape))
        return multipart_response(info, payload, "labels.npy", "application/octet-stream", headers)
    data, name = write_like(upload, labels)
    return multipart_response(info, data, name, "application/octet-stream", headers)


@app.post(
    "/v1/segment",
    summary="Prompt-to-mask for one 2D image and one class",
    response_class=Response,
    responses=_responses(400, 413, *_CALL_ERRORS, ok=_ARRAY),
)
async def segment(
    image: UploadFile = File(..., description=".npy (H, W) or a NIfTI with one slice"),
    prompt: str = Form(
        ...,
        description='JSON: {"class": "LV" | 3, "points": [[x, y], ...], "point_labels": [1, 0, ...], "box": [x0, y0, x1, y1]}',
    ),
    mask: UploadFile | None = File(None, description=".npy (H, W) mask prompt, probabilities in [0, 1]"),
):
    upload = read_upload(await image.read(), image.filename or "", None, RUNTIME.settings.limits)
    if upload.slices.shape[0] != 1:
        raise _bad(f"/v1/segment takes one 2D image, got {upload.slices.shape[0]} slices")
    img = upload.slices[0]
    h, w = img.shape
    try:
        p = json.loads(prompt)
    except ValueError as exc:  # JSONDecodeError, and integers over Python's 4300-digit limit
        raise _bad(f"prompt is not valid JSON: {exc}") from None
    if not isinstance(p, dict) or "class" not in p:
        raise _bad('prompt must be a JSON object with a "class" field')
    cls_ids = _class_ids(str(p["class"]), await classes())
    if not cls_ids or len(cls_ids) != 1:
        raise _bad(f'prompt "class" must name exactly one class, got {str(p["class"])[:64]!r}')
    cls = cls_ids[0]
    points = point_labels = box = mask_arr = None
    if p.get("points") is not None:
        points = _float_array(p["points"], "points", (-1, 2))
        if len(points) == 0 or len(points) > 64:
            raise _bad("points must hold 1 to 64 [x, y] pairs")
        point_labels = _float_array(p.get("point_labels", [1] * len(points)), "point_labels", (-1,))
        if len(point_labels) != len(points) or not np.isin(point_labels, (0, 1)).all():
            raise _bad("point_labels must give 0 (negative) or 1 (positive) for each point")
        if (
            (points[:, 0] < 0).any()
            or (points[:, 0] >= w).any()
            or (points[:, 1] < 0).any()
            or (points[:, 1] >= h).any()
        ):
            raise _bad(f"points must lie inside the image ({w}×{h}, x then y)")
    if p.get("box") is not None:
        box = _float_array(p["box"], "box", (4,))
        if not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
            raise _bad(f"box must be [x0, y0, x1, y1] with x0 < x1 <= {w} and y0 < y1 <= {h}")
    if mask is not None:
        mask_arr = read_npy(await mask.read(), RUNTIME.settings.limits.max_array_bytes)
        if mask_arr.shape != img.shape:
            raise _bad(f"mask shape {mask_arr.shape} does not match the image {img.shape}")
        # `probabilities` wants (C ≥ 2, H, W): validate the mask as the two-class map (1 - m, m).
        m = mask_arr.astype(np.float32) / (255.0 if mask_arr.dtype == np.uint8 else 1.0)
        mask_arr = probabilities(np.stack([1 - m, m]), "mask", RUNTIME.settings.limits)[1]
    out = await call("segment", img, cls, points, point_labels, box, mask_arr)
    if "error" in out:
        raise _bad(out["error"])
    info = {"class": cls, "confidence": out["confidence"], "shape": [h, w]}
    return multipart_response(info, write_npy(out["mask"]), "mask.npy", "application/octet-stream")


@app.get(
    "/v1/templates",
    summary="The template bank: version, classes and exemplars",
    responses=_responses(*_CALL_ERRORS),
)
async def list_templates():
    return await call("templates")


@app.post(
    "/v1/templates",
    summary="Add a labeled exemplar (each slice with foreground becomes one)",
    responses=_responses(400, 409, 413, *_CALL_ERRORS),
)
async def add_template(
    image: UploadFile = File(..., description="NIfTI volume/slice or .npy (H, W) / (D, H, W)"),
    label: UploadFile = File(..., description="label map of the same shape, integer class indices"),
    classes_json: str = Form(
        ..., alias="classes", description='class table, JSON: [{"index": 0, "name": "background"}, ...]'
    ),
    case_id: str = Form(..., description="an id for this case: letters, digits, '_' or '-'"),
    patient_id: str | None = Form(None),
):
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,48}", case_id):
        raise _bad("case_id must be 1-48 letters, digits, '_' or '-'")
    if patient_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", patient_id):
        raise _bad("patient_id must be 1-64 letters, digits, '_' or '-'")
    try:
        table = json.loads(classes_json)
    except ValueError:  # JSONDecodeError, and integers over Python's 4300-digit limit
        table = None
    if not (isinstance(table, list) and all(isinstance(c, dict) and "index" in c and "name" in c for c in table)):
        raise _bad('classes must be a JSON list of {"index": int, "name": str}')
    img = read_upload(await image.read(), image.filename or "", None, RUNTIME.settings.limits)
    lab = read_upload(
        await label.read(),
        label.filename or "",
        img.axis if img.kind == "nifti" else None,
        RUNTIME.settings.limits,
        is_label=True,
    )
    if img.slices.shape != lab.slices.shape:
        raise _bad(f"label shape {lab.original_shape} does not match image shape {img.original_shape}")
    out = await call(
        "add_templates", img.slices, lab.slices.astype(np.uint8), table, case_id, patient_id or case_id
    )
    if "error" in out:
        raise _bad(out["error"], 409 if "already" in out["error"] else 400)
    RUNTIME.classes = None
    return out


@app.delete(
    "/v1/templates/{template_id}", summary="Remove an exemplar", responses=_responses(400, 404, *_CALL_ERRORS)
)
async def remove_template(template_id: str):
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", template_id):
        raise _bad("template ids are 1-64 letters, digits, '_' or '-'")
    out = await call("remove_template", template_id)
    if "error" in out:
        raise _bad(out["error"], 404 if "no exemplar" in out["error"] else 400)
    return out


@app.get(
    "/v1/info", summary="Model, bank version, classes, device and replica", responses=_responses(*_CALL_ERRORS)
)
async def get_info():
    replica = await call("info")
    return {"service": "vessa", "api_version": "v1", **replica}


@app.get("/healthz", summary="Liveness")
async def healthz():
    return {"status": "ok"}


@app.get(
    "/readyz",
    summary="Readiness: a warmed-up assistant replica answered",
    responses={
        503: {
            "description": "Not ready (no replica answered, or still warming up)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def readyz():
    try:
        replica = await asyncio.wait_for(handle().info.remote(), 10)
    except Exception as exc:
        return JSONResponse(
            status_code=503, content={"status": "not ready", "detail": f"{type(exc).__name__}"}
        )
    if not replica.get("ready"):
        return JSONResponse(status_code=503, content={"status": "warming up"})
    return {"status": "ready", "bank_version": replica["bank_version"], "model": replica["model"]}


@app.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses=_responses(401, ok="text/plain"),
)
async def get_metrics():
    now = time.time()
    m_rate.set(sum(n for t, n in recent if t >= now - 60) / 60.0)
    try:
        replica = await asyncio.wait_for(handle().info.remote(), 5)
        for size, count in replica.get("batch_size_histogram", {}).items():
            m_batch.labels(size).set(count)
    except Exception:
        pass
    if RUNTIME.settings.redis_url:
        await asyncio.to_thread(_queue_depth, RUNTIME.settings, m_queue, m_pending, m_bulk)
    return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")


def _queue_depth(settings: ApiSettings, depth: Gauge, pending: Gauge, bulk: Gauge) -> None:
    try:
        import redis

        from shared.stream_messages import BULK_STREAM

        r = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        depth.set(r.xlen(settings.request_stream))
        bulk.set(r.xlen(BULK_STREAM))
        groups = r.xinfo_groups(settings.request_stream)
        pending.set(sum(g["pending"] for g in groups))
    except Exception:
        pass


def _float_array(value, what: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer beyond float64
        raise _bad(f"{what} must be numbers") from None
    if arr.ndim != len(shape) or any(s != -1 and s != d for s, d in zip(shape, arr.shape)):
        raise _bad(f"{what} has shape {list(arr.shape)}, expected {['any' if s == -1 else s for s in shape]}")
    check_finite(arr, what)
    return arr


def _read_probs(data: bytes, filename: str, upload: UploadedVolume, limits: Limits) -> list[np.ndarray]:
    """Student probabilities matching the upload: per slice (C, H, W)."""
    if upload.kind == "npy":
        arr = read_npy(data, limits.max_array_bytes)
        if arr.ndim == 3:
            arr = arr[None]
        if (
            arr.ndim != 4
            or arr.shape[0] != upload.slices.shape[0]
            or arr.shape[2:] != upload.slices.shape[1:]
        ):
            raise WireError(
                f"student probabilities of shape {arr.shape} do not match the slices {upload.slices.shape}: expected (B, C, H, W)"
            )
        return [probabilities(a, f"student probabilities of slice {i}", limits) for i, a in enumerate(arr)]
    vol = read_upload(data, filename, upload.axis, limits, allow_4d=True)
    if vol.channels is None:
        raise WireError("student probabilities as NIfTI must be 4D (X, Y, Z, C)")
    arr = vol.channels  # (D, C, H, W)
    if arr.shape[0] != upload.slices.shape[0] or arr.shape[2:] != upload.slices.shape[1:]:
        raise WireError(
            f"student probabilities of spatial shape {vol.original_shape} do not match the volume {upload.original_shape}"
        )
    return [probabilities(a, f"student probabilities of slice {i}", limits) for i, a in enumerate(arr)]


# ---------------------------------------------------------------------------------------------- Serve
@serve.deployment(name="VessaIngress", max_ongoing_requests=128, max_queued_requests=512)
@serve.ingress(app)
class VessaIngress:
    """The FastAPI app above, served by Ray Serve; holds the handle to the assistant deployment."""

    def __init__(self, assistant: DeploymentHandle, settings: dict | None = None):
        # Serve ships this class by value; the routes live in the imported module, so configure that.
        from assistant_server import api

        api.RUNTIME.configure(assistant, api.ApiSettings(**(settings or {})))
        api.jobs_routes.configure(**api.RUNTIME.settings.model_dump())

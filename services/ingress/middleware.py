"""ASGI guards in front of every route: the bearer token and the request body limit, before any parsing."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from services.ingress.routes.monailabel import OPEN_PATHS as MONAILABEL_OPEN_PATHS
from services.ingress.routes.ui import OPEN_PATHS as UI_OPEN_PATHS
from services.ingress.settings import ApiSettings

# the page is only the login form without a token; MONAI Label's clients ask whether auth is on and log in
OPEN_PATHS = {"/healthz", "/readyz", *UI_OPEN_PATHS, *MONAILABEL_OPEN_PATHS}


class GuardMiddleware:
    """Bearer-token check (constant-time) and a request body limit (413), before any parsing."""

    def __init__(self, app: ASGIApp, settings: ApiSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = self.settings.api_token.encode() if self.settings.api_token else None
        max_bytes = int(self.settings.max_upload_mb * 1024 * 1024)
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

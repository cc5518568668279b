"""The review page (docs/review.md): static files, no build step, nothing fetched from a CDN.

The page itself holds no data: it is served without a token (the login form is part of it) and asks
for everything else over the API with the bearer token the user typed, kept in the tab's
sessionStorage. So with VESSA_API_TOKEN set, nothing but the login form is reachable without it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse, Response

router = APIRouter(tags=["ui"], include_in_schema=False)
UI_DIR = Path(__file__).resolve().parent.parent / "ui"
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
OPEN_PATHS = {"/ui", "/ui/", *(f"/ui/{name}" for name in FILES)}


@router.get("/ui")
async def ui_root() -> RedirectResponse:
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui/")
async def ui_index() -> Response:
    return _file("index.html")


@router.get("/ui/{name}")
async def ui_file(name: str) -> Response:
    if name not in FILES:
        raise HTTPException(404, "no such file")
    return _file(name)


def _file(name: str) -> Response:
    headers = {
        "cache-control": "no-cache",
        # the page talks only to this service, runs only its own script, and is never framed
        "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'",
        "x-content-type-options": "nosniff",
    }
    return Response((UI_DIR / name).read_bytes(), media_type=FILES[name], headers=headers)

"""Error answers of every route: `{"detail": "..."}` with a 4xx that says what was wrong, once."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.ingress.uploads import VolumeError
from shared.wire.arrays import WireError

# what the routes that call the assistant answer, by status
CALL_TEXT = {
    400: "Bad input; `detail` says what is wrong",
    401: "Missing or invalid bearer token (when VESSA_API_TOKEN is set)",
    404: "No such exemplar",
    409: "A pinned bank version that no longer exists, or a duplicate exemplar",
    413: "Request body over max_upload_mb",
    503: "The assistant is at capacity (backpressure) or not connected: retry later",
    504: "The assistant did not answer within request_timeout_s (plus request_timeout_per_slice_s for each slice of a pseudo-label call)",
}
CALL_ERRORS = (401, 503, 504)  # any route that calls the assistant


class ErrorDetail(BaseModel):
    detail: str


def bad(detail: str, status: int = 400) -> HTTPException:
    """The exception a route raises for a client error (or a 503/504 of the assistant)."""
    return HTTPException(status_code=status, detail=detail)


def error_responses(text: dict[int, str], *codes: int, ok: str | None = None) -> dict:
    """OpenAPI `responses` of a route: its error statuses, each described by `text[code]`, and for `ok`
    the media type of a 200 that is not JSON."""
    out: dict = {c: {"model": ErrorDetail, "description": text[c]} for c in codes}
    if ok is not None:
        out[200] = {"content": {ok: {"schema": {"type": "string", "format": "binary"}}}}
    return out


def install_error_handlers(app: FastAPI) -> None:
    """Input errors raised below the routes (array and volume decoding) answer 400 with their message."""

    async def as_400(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    app.add_exception_handler(WireError, as_400)
    app.add_exception_handler(VolumeError, as_400)

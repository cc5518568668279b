"""Array responses: `multipart/mixed` with a JSON part, then the array file part."""

from __future__ import annotations

import json
import secrets

from fastapi.responses import Response

MEDIA_TYPE = "multipart/mixed"


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
    return Response(content=body, media_type=f"{MEDIA_TYPE}; boundary={boundary}", headers=headers)

"""`POST /v1/segment`: one 2D image + explicit prompts (points, box, mask) + a class → mask + confidence."""

from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Depends, File, Form, UploadFile
from fastapi.responses import Response

from services.ingress.errors import CALL_ERRORS, CALL_TEXT, bad, error_responses
from services.ingress.multipart import MEDIA_TYPE, multipart_response
from services.ingress.routes.pseudo_labels import parse_class_ids
from services.ingress.state import IngressState, get_state
from services.ingress.uploads import read_upload
from shared.wire.arrays import check_finite, read_npy, write_npy
from shared.wire.protocol import probabilities

router = APIRouter()


@router.post(
    "/v1/segment",
    summary="Prompt-to-mask for one 2D image and one class",
    response_class=Response,
    responses=error_responses(CALL_TEXT, 400, 413, *CALL_ERRORS, ok=MEDIA_TYPE),
)
async def segment(
    image: UploadFile = File(..., description=".npy (H, W) or a NIfTI with one slice"),
    prompt: str = Form(
        ...,
        description='JSON: {"class": "LV" | 3, "points": [[x, y], ...], "point_labels": [1, 0, ...], "box": [x0, y0, x1, y1]}',
    ),
    mask: UploadFile | None = File(None, description=".npy (H, W) mask prompt, probabilities in [0, 1]"),
    state: IngressState = Depends(get_state),
):
    limits = state.settings.limits
    upload = read_upload(await image.read(), image.filename or "", None, limits)
    if upload.slices.shape[0] != 1:
        raise bad(f"/v1/segment takes one 2D image, got {upload.slices.shape[0]} slices")
    img = upload.slices[0]
    h, w = img.shape
    try:
        p = json.loads(prompt)
    except ValueError as exc:  # JSONDecodeError, and integers over Python's 4300-digit limit
        raise bad(f"prompt is not valid JSON: {exc}") from None
    if not isinstance(p, dict) or "class" not in p:
        raise bad('prompt must be a JSON object with a "class" field')
    cls_ids = parse_class_ids(str(p["class"]), await state.classes())
    if not cls_ids or len(cls_ids) != 1:
        raise bad(f'prompt "class" must name exactly one class, got {str(p["class"])[:64]!r}')
    cls = cls_ids[0]
    points = point_labels = box = mask_arr = None
    if p.get("points") is not None:
        points = _float_array(p["points"], "points", (-1, 2))
        if len(points) == 0 or len(points) > 64:
            raise bad("points must hold 1 to 64 [x, y] pairs")
        point_labels = _float_array(p.get("point_labels", [1] * len(points)), "point_labels", (-1,))
        if len(point_labels) != len(points) or not np.isin(point_labels, (0, 1)).all():
            raise bad("point_labels must give 0 (negative) or 1 (positive) for each point")
        if (
            (points[:, 0] < 0).any()
            or (points[:, 0] >= w).any()
            or (points[:, 1] < 0).any()
            or (points[:, 1] >= h).any()
        ):
            raise bad(f"points must lie inside the image ({w}×{h}, x then y)")
    if p.get("box") is not None:
        box = _float_array(p["box"], "box", (4,))
        if not (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h):
            raise bad(f"box must be [x0, y0, x1, y1] with x0 < x1 <= {w} and y0 < y1 <= {h}")
    if mask is not None:
        mask_arr = read_npy(await mask.read(), limits.max_array_bytes)
        if mask_arr.shape != img.shape:
            raise bad(f"mask shape {mask_arr.shape} does not match the image {img.shape}")
        # `probabilities` wants (C ≥ 2, H, W): validate the mask as the two-class map (1 - m, m).
        m = mask_arr.astype(np.float32) / (255.0 if mask_arr.dtype == np.uint8 else 1.0)
        mask_arr = probabilities(np.stack([1 - m, m]), "mask", limits)[1]
    out = await state.call("segment", img, cls, points, point_labels, box, mask_arr)
    if "error" in out:
        raise bad(out["error"])
    info = {"class": cls, "confidence": out["confidence"], "shape": [h, w]}
    return multipart_response(info, write_npy(out["mask"]), "mask.npy", "application/octet-stream")


def _float_array(value, what: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer beyond float64
        raise bad(f"{what} must be numbers") from None
    if arr.ndim != len(shape) or any(s != -1 and s != d for s, d in zip(shape, arr.shape)):
        raise bad(f"{what} has shape {list(arr.shape)}, expected {['any' if s == -1 else s for s in shape]}")
    check_finite(arr, what)
    return arr

"""The template bank over REST: list, add a labeled exemplar, remove one."""

from __future__ import annotations

import json
import re

import numpy as np
from fastapi import APIRouter, Depends, File, Form, UploadFile

from services.ingress.errors import CALL_ERRORS, CALL_TEXT, bad, error_responses
from services.ingress.state import IngressState, get_state
from services.ingress.uploads import read_upload

router = APIRouter()


@router.get(
    "/v1/templates",
    summary="The template bank: version, classes and exemplars",
    responses=error_responses(CALL_TEXT, *CALL_ERRORS),
)
async def list_templates(state: IngressState = Depends(get_state)):
    return await state.call("templates")


@router.post(
    "/v1/templates",
    summary="Add a labeled exemplar (each slice with foreground becomes one)",
    responses=error_responses(CALL_TEXT, 400, 409, 413, *CALL_ERRORS),
)
async def add_template(
    image: UploadFile = File(..., description="NIfTI volume/slice or .npy (H, W) / (D, H, W)"),
    label: UploadFile = File(..., description="label map of the same shape, integer class indices"),
    classes_json: str = Form(
        ..., alias="classes", description='class table, JSON: [{"index": 0, "name": "background"}, ...]'
    ),
    case_id: str = Form(..., description="an id for this case: letters, digits, '_' or '-'"),
    patient_id: str | None = Form(None),
    state: IngressState = Depends(get_state),
):
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,48}", case_id):
        raise bad("case_id must be 1-48 letters, digits, '_' or '-'")
    if patient_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", patient_id):
        raise bad("patient_id must be 1-64 letters, digits, '_' or '-'")
    try:
        table = json.loads(classes_json)
    except ValueError:  # JSONDecodeError, and integers over Python's 4300-digit limit
        table = None
    if not (isinstance(table, list) and all(isinstance(c, dict) and "index" in c and "name" in c for c in table)):
        raise bad('classes must be a JSON list of {"index": int, "name": str}')
    limits = state.settings.limits
    img = read_upload(await image.read(), image.filename or "", None, limits)
    lab = read_upload(
        await label.read(), label.filename or "", img.axis if img.kind == "nifti" else None, limits, is_label=True
    )
    if img.slices.shape != lab.slices.shape:
        raise bad(f"label shape {lab.original_shape} does not match image shape {img.original_shape}")
    out = await state.call(
        "add_templates", img.slices, lab.slices.astype(np.uint8), table, case_id, patient_id or case_id
    )
    if "error" in out:
        raise bad(out["error"], 409 if "already" in out["error"] else 400)
    state.forget_classes()
    return out


@router.delete(
    "/v1/templates/{template_id}",
    summary="Remove an exemplar",
    responses=error_responses(CALL_TEXT, 400, 404, *CALL_ERRORS),
)
async def remove_template(template_id: str, state: IngressState = Depends(get_state)):
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", template_id):
        raise bad("template ids are 1-64 letters, digits, '_' or '-'")
    out = await state.call("remove_template", template_id)
    if "error" in out:
        raise bad(out["error"], 404 if "no exemplar" in out["error"] else 400)
    return out

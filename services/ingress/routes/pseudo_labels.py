"""`POST /v1/pseudo-labels`: a NIfTI volume, a .npy batch of slices or a zip of one DICOM series →
label map (NIfTI for a volume or a series, .npy for slices; a DICOM-SEG with `format=dicom-seg`) +
confidence."""

from __future__ import annotations

import asyncio
import re
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response

from services.ingress.dicom_upload import is_zip, read_dicom_zip
from services.ingress.errors import CALL_ERRORS, CALL_TEXT, bad, error_responses
from services.ingress.multipart import MEDIA_TYPE, multipart_response
from services.ingress.state import IngressState, get_state
from services.ingress.uploads import UploadedVolume, read_upload, write_like
from shared.wire.arrays import WireError, decode_array, read_npy, write_npy
from shared.wire.protocol import AssistReply, Limits, encode_call, probabilities

router = APIRouter()


def parse_class_ids(spec: str | None, classes: list[dict]) -> list[int] | None:
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
            raise bad(
                f"unknown class {token!r}: known classes are {[c['name'] for c in classes if c['index'] != 0]}"
            )
    return ids


@router.post(
    "/v1/pseudo-labels",
    summary="Pseudo-label a NIfTI volume, a .npy batch of 2D slices or a zip of one DICOM series",
    response_class=Response,
    responses=error_responses(CALL_TEXT, 400, 409, 413, *CALL_ERRORS, ok=MEDIA_TYPE),
)
async def pseudo_labels(
    file: UploadFile = File(
        ..., description=".nii, .nii.gz (a volume), .npy ((B, H, W) or (H, W) slices) or .zip (one DICOM series)"
    ),
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
    format_: Literal["nifti", "dicom-seg"] = Query(
        "nifti",
        alias="format",
        description="a DICOM upload's answer: the label map as NIfTI (default) or as a DICOM-SEG referencing the series",
    ),
    state: IngressState = Depends(get_state),
):
    limits = state.settings.limits
    data = await file.read()
    if is_zip(data):
        if probs is not None:
            raise bad("student probabilities are not supported with a DICOM upload")
        # unpacking and decoding a series is CPU work: off the event loop
        frames = await asyncio.to_thread(read_dicom_zip, data, limits)
        timeout = state.timeout_for(sum(len(f.image) for f in frames))
        classes = await state.classes(timeout=timeout)
        return await _dicom(frames, parse_class_ids(classes_, classes), classes, timeout, state, format_)
    if format_ != "nifti":
        raise bad("format=dicom-seg needs a DICOM upload (a zip of one series): a NIfTI or .npy has no instances to reference")
    upload = read_upload(data, file.filename or "", axis, limits, allow_cine=True)
    timeout = state.timeout_for(len(upload.slices))
    classes = await state.classes(timeout=timeout)
    ids = parse_class_ids(classes_, classes)
    if upload.frames is not None:
        if probs is not None:
            raise bad("student probabilities are not supported with a 4D cine: send its frames one by one")
        return await _cine(upload, ids, classes, timeout, state)
    prob_slices = None
    if probs is not None:
        prob_slices = _read_probs(await probs.read(), probs.filename or "", upload, limits)
    meta, blobs = encode_call(
        list(upload.slices),
        probs=prob_slices,
        class_ids=ids,
        return_probs=return_probs and upload.kind == "npy",
        volume=upload.kind != "npy",  # a NIfTI volume is one piece; a .npy batch is independent slices
    )
    reply_meta, reply_blobs = await state.call(
        "assist", meta.model_dump_json(), blobs, timeout=timeout
    )
    reply = AssistReply.model_validate_json(reply_meta)
    if reply.status == "error":
        raise bad(
            reply.error or "assistant error",
            409 if reply.error_kind == "bank_version" else (500 if reply.error_kind == "internal" else 400),
        )
    labels = np.stack([decode_array(s.label, reply_blobs) for s in reply.slices])
    n = len(reply.slices)
    state.metrics.count_slices(n)
    info = {
        "shape": list(upload.original_shape),
        "slices": n,
        "axis": upload.axis,
        "classes": {str(c["index"]): c["name"] for c in classes},
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


async def _frames(frames: list[np.ndarray], ids, timeout: float, state: IngressState):
    """Frame by frame (each frame one volume call: its slices' 3D context): the label maps (D, H, W),
    the confidence per frame, slice and class, and the last reply (its versions)."""
    labels, confidence = [], []
    reply = None
    for frame in frames:
        meta, blobs = encode_call(list(frame), class_ids=ids, volume=True)
        reply_meta, reply_blobs = await state.call("assist", meta.model_dump_json(), blobs, timeout=timeout)
        reply = AssistReply.model_validate_json(reply_meta)
        if reply.status == "error":
            raise bad(
                reply.error or "assistant error",
                409 if reply.error_kind == "bank_version" else (500 if reply.error_kind == "internal" else 400),
            )
        labels.append(np.stack([decode_array(s.label, reply_blobs) for s in reply.slices]).astype(np.uint8))
        confidence.append([s.confidence for s in reply.slices])
        state.metrics.count_slices(len(reply.slices))
    return labels, confidence, reply


async def _dicom(frames, ids, classes: list[dict], timeout: float, state: IngressState, fmt: str):
    """A DICOM series (one Volume, or one per temporal position of a cine) → its label map in the
    series' scanner geometry as NIfTI (4D for a cine, as `vessa label` writes it), or as a DICOM-SEG
    referencing the series' instances (`fmt` "dicom-seg"; one 3D series only)."""
    from shared.data.cine import cine_labels_to_nifti
    from shared.data.dicom_seg import Algorithm, build_seg, seg_bytes
    from shared.data.nifti import label_to_nifti_bytes, nifti_to_bytes

    if fmt == "dicom-seg" and len(frames) > 1:
        raise bad(
            f"format=dicom-seg with a cine series ({len(frames)} temporal positions): ask for the 4D NIfTI, "
            "or label it as a job (one SEG per frame)"
        )
    labels, confidence, reply = await _frames([f.image for f in frames], ids, timeout, state)
    src = frames[0].meta["dicom"]
    info = {
        "series_uid": src.series_uid,
        "study_uid": src.study_uid,
        "shape": [len(frames), *frames[0].image.shape] if len(frames) > 1 else list(frames[0].image.shape),
        "shape_layout": "(frames, slices, rows, columns)" if len(frames) > 1 else "(slices, rows, columns)",
        "slices": sum(len(c) for c in confidence),
        "classes": {str(c["index"]): c["name"] for c in classes},
        "confidence": confidence if len(frames) > 1 else confidence[0],
        "confidence_layout": ("per frame, " if len(frames) > 1 else "")
        + "per slice in the series' slice order, per class index (background first); null = class not requested",
        "model_version": reply.model_version,
        "bank_version": reply.bank_version,
        "format": fmt,
    }
    if len(frames) > 1:
        info["frames"] = len(frames)
    headers = {"X-VESSA-Bank-Version": str(reply.bank_version), "X-VESSA-Model": reply.model_version}
    if fmt == "dicom-seg":
        names = {c["index"]: c["name"] for c in classes}
        class_ids = ids or sorted(k for k in names if k != 0)
        algorithm = Algorithm(reply.model_version, reply.bank_version)
        try:
            seg = await asyncio.to_thread(build_seg, labels[0], frames[0], names, class_ids, algorithm)
            data = await asyncio.to_thread(seg_bytes, seg)
        except Exception as exc:  # highdicom's checks raise several types: the series is what it refused
            raise bad(f"DICOM-SEG: {exc}") from None
        return multipart_response(info, data, "labels.dcm", "application/dicom", headers)
    if len(frames) > 1:
        data = nifti_to_bytes(await asyncio.to_thread(cine_labels_to_nifti, labels, frames))
    else:
        data = await asyncio.to_thread(label_to_nifti_bytes, labels[0], frames[0])
    return multipart_response(info, data, "labels.nii.gz", "application/octet-stream", headers)


async def _cine(upload: UploadedVolume, ids, classes: list[dict], timeout: float, state: IngressState):
    """A 4D cine, frame by frame: each frame one volume call (its slices' 3D context), the answers
    stacked into one 4D label map in the input's geometry; confidence per frame, slice and class."""
    labels, confidence, reply = await _frames(list(upload.frames), ids, timeout, state)
    info = {
        "shape": list(upload.original_shape),
        "frames": len(labels),
        "slices": sum(len(c) for c in confidence),
        "axis": upload.axis,
        "classes": {str(c["index"]): c["name"] for c in classes},
        "confidence": confidence,
        "confidence_layout": "per frame, per slice along the through-plane axis, per class index (background first); null = class not requested",
        "model_version": reply.model_version,
        "bank_version": reply.bank_version,
    }
    headers = {"X-VESSA-Bank-Version": str(reply.bank_version), "X-VESSA-Model": reply.model_version}
    data, name = write_like(upload, np.stack(labels))
    return multipart_response(info, data, name, "application/octet-stream", headers)


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

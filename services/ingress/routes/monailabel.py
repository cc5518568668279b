"""MONAI Label's REST API on the ingress (docs/monailabel.md), so 3D Slicer's MONAI Label module, OHIF's
panel and the `monailabel` client use VESSA unchanged. Same auth, body limits and error rules as every
route; errors a MONAI Label server answers with 500 are 4xx here, with a message.

  GET    /info/                          app, labels, models (one per served assistant), strategies, trainers, datastore stats
  POST   /infer/{model}?image=ID         the pseudo-label of a datastore image (or an uploaded `file`): multipart params + label file
  GET    /datastore/?output=stats|all|train
  PUT    /datastore/image (also /datastore/)     upload an image (NIfTI or NRRD)
  DELETE /datastore/image?id= (also /datastore/)  remove an uploaded image
  GET|HEAD /datastore/image?image=       the image file
  GET|PUT /datastore/image/info          image info
  PUT    /datastore/label?image=&tag=final  save a label (NIfTI or NRRD); `final` = a reviewed correction
  GET    /datastore/label?label=&tag=    a label file (HEAD /datastore/label?image=&tag=: does it exist)
  DELETE /datastore/label?id=&tag=
  GET|PUT /datastore/label/info
  POST   /activelearning/{strategy}      the next image (vessa, random, first); {} when none is left
  GET    /train/?check_if_running=true   404 when nothing trains; POST /train/{model}; DELETE /train/
  GET    /auth/, POST /auth/token, GET /auth/token/valid   VESSA's bearer token as MONAI Label's auth

Every inference goes to the assistant replicas (`IngressState.call`); the ingress only reads and writes
files. The datastore is `monailabel_datastore` under `data_root` (services/ingress/monailabel/datastore.py).
"""

from __future__ import annotations

import asyncio
import hmac
import re
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Body, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response

from services.ingress.errors import bad, error_responses
from services.ingress.monailabel.datastore import (
    FINAL,
    Datastore,
    DatastoreError,
    check_id,
    check_tag,
    parse_info,
)
from services.ingress.monailabel.strategies import STRATEGIES, DescriptorCache, next_sample
from services.ingress.monailabel.training import (
    FineTuner,
    TrainRun,
    parse_params,
    remove_run,
    run_paths,
    trainer_info,
)
from services.ingress.monailabel.volumes import RESULT_EXTENSIONS, encode_label, read_image, read_label
from services.ingress.routes.jobs import confine
from services.ingress.routes.pseudo_labels import parse_class_ids
from services.ingress.state import IngressState, get_state
from services.ingress.uploads import VolumeError
from services.labeling.runner import case_confidence, class_stats
from shared.data.nifti import label_to_nifti_bytes
from shared.wire.arrays import decode_array
from shared.wire.protocol import AssistReply, encode_call

router = APIRouter(tags=["monailabel"])

TEXT = {
    400: "Bad input (a malformed file or label, an id that is a path, bad params); `detail` says what",
    401: "Missing or invalid bearer token (when VESSA_API_TOKEN is set)",
    404: "No such model, strategy, image or label, no datastore on this service, or no training task",
    409: "The request conflicts with what is stored (an id in use, source data, a job's output)",
    413: "Request body over max_upload_mb",
    429: "A training task is already running",
    503: "The assistant is at capacity (backpressure) or not connected: retry later",
    504: "The assistant did not answer in time",
}
_DS = error_responses(TEXT, 400, 401, 404, 409)
_UPLOAD = error_responses(TEXT, 400, 401, 404, 409, 413, 503, 504)

MODEL = "vessa"  # the one served assistant (every replica of the VessaAssistant deployment)
APP_VERSION = "0.1.0"
# MONAI Label's clients ask whether auth is on, and log in, before they have a token
OPEN_PATHS = {"/auth", "/auth/", "/auth/token"}


class Facade:
    """Per-app state of the dialect: the datastore (None when none is configured), the ranking's
    descriptor cache, which image was handed to whom, the last model and bank versions seen."""

    def __init__(self, state: IngressState):
        s = state.settings
        self.datastore: Datastore | None = None
        self.problem = (
            "this service has no MONAI Label datastore: set data_root (VESSA_DATA_ROOT) and "
            "monailabel_datastore (VESSA_MONAILABEL_DATASTORE, a dataset directory under the data root)"
        )
        if s.data_root and s.monailabel_datastore:
            root = confine(s.monailabel_datastore, s.data_root)
            job_root = Path(s.job_output_root or Path(s.data_root) / "vessa-labels")
            store = Path(s.monailabel_store) if s.monailabel_store else job_root / "monailabel" / root.name
            self.datastore = Datastore(root, Path(s.data_root), store, job_root)
        self.descriptors = DescriptorCache()
        self.handed: dict[str, tuple[float, str | None]] = {}
        self.versions: dict[str, Any] = {}
        self.train_run: TrainRun | None = None

    def ds(self) -> Datastore:
        if self.datastore is None:
            raise bad(self.problem, 404)
        return self.datastore


def get_facade(request: Request) -> Facade:
    facade = getattr(request.app.state, "monailabel", None)
    if facade is None:
        facade = Facade(get_state(request))
        request.app.state.monailabel = facade
    return facade


async def _ds_call(fn, *args):
    """A datastore operation in a thread (file I/O), its refusals as 4xx."""
    try:
        return await asyncio.to_thread(fn, *args)
    except DatastoreError as exc:
        raise bad(str(exc), exc.status) from None


def _params(text: str | None, what: str = "params") -> dict:
    try:
        return parse_info(text, what)
    except DatastoreError as exc:
        raise bad(str(exc), exc.status) from None


def _model(name: str) -> None:
    if name != MODEL:
        raise bad(f"no model {name!r}: this server has {[MODEL]}", 404)


def _foreground(classes: list[dict]) -> list[dict]:
    return sorted((c for c in classes if c["index"] != 0), key=lambda c: c["index"])


# ------------------------------------------------------------------------------------------------ info
@router.get("/info/", summary="MONAI Label: app info (labels, models, strategies, trainers, datastore)", responses=error_responses(TEXT, 401, 404, 503, 504))
@router.get("/info", include_in_schema=False)
async def info(state: IngressState = Depends(get_state), facade: Facade = Depends(get_facade)) -> dict:
    classes = await state.classes()
    fg = _foreground(classes)
    label_names = {c["name"]: c["index"] for c in fg}
    stats = await _ds_call(facade.datastore.status) if facade.datastore else {"total": 0, "completed": 0, "label_tags": {}}
    seen = facade.versions
    about = f" (model {seen['model_version']}, bank version {seen['bank_version']})" if seen else ""
    trainers, train_stats = trainer_info(facade)
    # No top-level "config" key: Slicer's module takes one for an outdated server and refuses it.
    return {
        "name": "VESSA",
        "description": "VESSA pseudo-labels served over MONAI Label's API: a reference-guided foundation model "
        "and its template bank, on Ray Serve replicas",
        "version": APP_VERSION,
        "labels": [c["name"] for c in fg],  # an array: OHIF pushes to it
        "models": {
            MODEL: {
                "type": "segmentation",
                "labels": label_names,
                "dimension": 3,
                "description": "VESSA assistant: pseudo-label of a whole volume from the template bank" + about,
                "config": {"classes": "all"},
            }
        },
        "trainers": trainers,
        "strategies": {k: {"description": v} for k, v in STRATEGIES.items()},
        "scoring": {},
        "train_stats": train_stats,
        "datastore": stats,
    }


# ----------------------------------------------------------------------------------------------- infer
def _class_ids(value: Any, classes: list[dict]) -> list[int] | None:
    if value is None or value == "all" or value == "":
        return None
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str | int):
        raise bad("params.classes must be 'all', a list of class names or indices, or a comma-separated string")
    return parse_class_ids(str(value), classes)


def _form_data(params: dict, payload: bytes, filename: str) -> Response:
    """MONAI Label's infer answer: multipart/form-data with a `params` JSON part and the label file."""
    import json

    boundary = secrets.token_hex(16)
    body = b"".join(
        [
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\nContent-Type: application/json\r\n\r\n'.encode(),
            json.dumps(params).encode(),
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode(),
            payload,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    return Response(content=body, media_type=f"multipart/form-data; boundary={boundary}")


@router.post("/infer/{model}", summary="MONAI Label: the pseudo-label of a datastore image or an uploaded file", responses={**_UPLOAD, 200: {"content": {"multipart/form-data": {}, "application/json": {}, "application/octet-stream": {}}}})
async def infer(
    model: str,
    image: str = "",
    session_id: str = "",
    output: str | None = None,
    params: str = Form("{}"),
    file: UploadFile | None = File(None),
    label: UploadFile | None = File(None),
    state: IngressState = Depends(get_state),
    facade: Facade = Depends(get_facade),
):
    t0 = time.perf_counter()
    _model(model)
    if output not in (None, "", "all", "image", "json"):
        raise bad(f"output {output!r}: VESSA answers image, json or all (DICOM-SEG waits for DICOM support)")
    if session_id:
        raise bad("sessions are not supported: send the image as `file`, or upload it to the datastore")
    if label is not None:
        raise bad(f"model {MODEL!r} takes no label input (it is no scribbles or interactive model)")
    opts = _params(params)
    ext = opts.get("result_extension") or ".nii.gz"
    if ext not in RESULT_EXTENSIONS:
        raise bad(f"result_extension {ext!r}: one of {list(RESULT_EXTENSIONS)}")
    if opts.get("result_dtype") not in (None, "", "uint8"):
        raise bad("result_dtype: VESSA's label maps are uint8")
    limits = state.settings.limits
    try:
        if file is not None:
            data = await file.read()
            vol = await asyncio.to_thread(read_image, data, limits, "upload", "uploaded file")
            image_id = check_id(image) if image else "upload"
        elif image:
            img = await _ds_call(facade.ds().image, image)
            vol = await asyncio.to_thread(read_image, img.path, limits, img.id)
            image_id = img.id
        else:
            raise bad("neither an image id (image=) nor a file was given")
    except (VolumeError, DatastoreError) as exc:
        raise bad(str(exc), getattr(exc, "status", 400)) from None
    t_pre = time.perf_counter()
    timeout = state.timeout_for(vol.image.shape[0])
    classes = await state.classes(timeout=timeout)
    ids = _class_ids(opts.get("classes"), classes)
    meta, blobs = encode_call(list(vol.image), class_ids=ids, volume=True)
    reply_meta, reply_blobs = await state.call("assist", meta.model_dump_json(), blobs, timeout=timeout)
    reply = AssistReply.model_validate_json(reply_meta)
    if reply.status == "error":
        raise bad(reply.error or "assistant error", 409 if reply.error_kind == "bank_version" else (500 if reply.error_kind == "internal" else 400))
    t_infer = time.perf_counter()
    labels = np.stack([decode_array(s.label, reply_blobs) for s in reply.slices]).astype(np.uint8)
    conf = np.array([[np.nan if v is None else v for v in s.confidence] for s in reply.slices], dtype=np.float64)
    state.metrics.count_slices(len(reply.slices))
    fg = [c for c in _foreground(classes) if ids is None or c["index"] in ids]
    stats = class_stats(labels, conf, [c["index"] for c in fg], vol.spacing)
    payload = await asyncio.to_thread(encode_label, labels, vol, ext)
    facade.versions = {"model_version": reply.model_version, "bank_version": reply.bank_version}
    t_end = time.perf_counter()
    result = {
        "label_names": {c["name"]: c["index"] for c in fg},
        "confidence": {c["name"]: stats[c["index"]].confidence_mean for c in fg},
        "confidence_case": case_confidence(stats),
        "confidence_per_slice": [[None if not np.isfinite(v) else round(float(v), 4) for v in row] for row in conf],
        "latencies": {
            "pre": round(t_pre - t0, 3),
            "infer": round(t_infer - t_pre, 3),
            "post": round(t_end - t_infer, 3),
            "total": round(t_end - t0, 3),
            "transform": None,
        },
        "model": MODEL,
        "model_version": reply.model_version,
        "bank_version": reply.bank_version,
        "image": image_id,
        "result_extension": ext,
        "result_dtype": "uint8",
    }
    filename = f"{image_id}-{secrets.token_hex(4)}{ext}"  # unique: the client saves it under this name
    if output == "json":
        return JSONResponse(result)
    if output == "image":
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )
    return _form_data(result, payload, filename)


# ------------------------------------------------------------------------------------------- datastore
@router.get("/datastore/", summary="MONAI Label: the datastore (stats, all, or train pairs)", responses=_DS)
@router.get("/datastore", include_in_schema=False)
async def datastore(output: str | None = None, facade: Facade = Depends(get_facade)):
    ds = facade.ds()
    if output in (None, "", "stats"):
        return await _ds_call(ds.status)
    if output == "all":
        return await _ds_call(ds.json)
    if output == "train":
        return await _ds_call(ds.datalist)
    raise bad(f"output {output!r}: stats, all or train")


async def _stored_image_bytes(file: UploadFile, limits) -> bytes:
    """An uploaded image, checked, as NIfTI bytes (a NRRD converted with its geometry)."""
    from services.ingress.monailabel.volumes import _nifti_bytes

    data = await file.read()
    try:
        raw = await asyncio.to_thread(_nifti_bytes, data, limits, "uploaded image")
        await asyncio.to_thread(read_image, raw, limits, "upload", "uploaded image")  # readable, finite, in bounds
    except VolumeError as exc:
        raise bad(str(exc)) from None
    return raw


def _upload_id(image: str | None) -> str:
    """The id of an uploaded image: the client's `image`, else a new one (a file name is never used)."""
    return image or f"image-{secrets.token_hex(6)}"


@router.put("/datastore/image", summary="MONAI Label: upload an image (NIfTI or NRRD) into the store", responses=_UPLOAD)
@router.put("/datastore/", include_in_schema=False)
async def add_image(
    image: str | None = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    state: IngressState = Depends(get_state),
    facade: Facade = Depends(get_facade),
):
    ds = facade.ds()
    info = _params(params)
    image_id = _upload_id(image)
    await _ds_call(check_id, image_id)
    raw = await _stored_image_bytes(file, state.settings.limits)
    info = {k: v for k, v in info.items() if not (k == "client_id" and v is None)}
    return {"image": await _ds_call(ds.add_image, image_id, raw, info)}


@router.delete("/datastore/image", summary="MONAI Label: remove an uploaded image and its labels", responses=_DS)
@router.delete("/datastore/", include_in_schema=False)
async def remove_image(id: str, facade: Facade = Depends(get_facade)):
    await _ds_call(facade.ds().remove_image, id)
    return {}


def _file(path: Path) -> FileResponse:
    media = "application/gzip" if path.name.endswith(".gz") else "application/octet-stream"
    return FileResponse(path, media_type=media, filename=path.name)


@router.get("/datastore/image", summary="MONAI Label: download an image", responses={**_DS, 200: {"content": {"application/octet-stream": {}}}})
async def download_image(image: str, facade: Facade = Depends(get_facade)):
    img = await _ds_call(facade.ds().image, image)
    return FileResponse(img.path, media_type="application/octet-stream", filename=img.id + img.ext)


@router.head("/datastore/image", summary="MONAI Label: does an image exist", responses=_DS)
async def check_image(image: str, facade: Facade = Depends(get_facade)):
    await _ds_call(facade.ds().image, image)
    return {}


@router.get("/datastore/image/info", summary="MONAI Label: an image's info", responses=_DS)
async def image_info(image: str, facade: Facade = Depends(get_facade)):
    ds = facade.ds()
    img = await _ds_call(ds.image, image)
    return await _ds_call(ds.image_info, img)


@router.put("/datastore/image/info", summary="MONAI Label: update an image's info", responses=_DS)
async def put_image_info(image: str, info: str = Form("{}"), facade: Facade = Depends(get_facade)):
    return await _ds_call(facade.ds().update_image_info, image, _params(info, "info"))


@router.put("/datastore/label", summary="MONAI Label: save a label (final: a reviewed correction)", responses=_UPLOAD)
async def save_label(
    image: str,
    tag: str = FINAL,
    params: str = Form("{}"),
    label: UploadFile = File(...),
    state: IngressState = Depends(get_state),
    facade: Facade = Depends(get_facade),
):
    ds = facade.ds()
    tag = await _ds_call(check_tag, tag)
    opts = _params(params)
    img = await _ds_call(ds.image, image)
    data = await label.read()
    limits = state.settings.limits
    classes = await state.classes()
    fg = _foreground(classes)
    label_info = opts.get("label_info")
    if label_info is not None and not isinstance(label_info, list):
        raise bad('params.label_info must be a list of {"name": ...}')
    to_bank = bool(opts.get("add_to_bank", False))

    def validate():
        vol = read_image(img.path, limits, img.id)
        lab = read_label(data, vol, limits, [c["index"] for c in fg], {c["name"].lower(): c["index"] for c in fg}, label_info)
        return vol, lab

    try:
        vol, lab = await asyncio.to_thread(validate)
    except VolumeError as exc:
        raise bad(str(exc)) from None
    if to_bank and tag != FINAL:
        raise bad("add_to_bank: only a final label (a reviewed correction) goes into the template bank")
    if to_bank and not lab.any():
        raise bad("add_to_bank: the label map has no foreground, so it gives the bank no exemplar")
    nifti = await asyncio.to_thread(label_to_nifti_bytes, lab, vol)
    info = {k: v for k, v in opts.items() if k != "client_id" or v is not None}
    if tag != FINAL:
        await _ds_call(ds.save_tag, img, tag, nifti, info)
        return {"image": img.id, "label": img.id, "tag": tag}
    fin = await _ds_call(ds.save_final, img, nifti, info)
    out = {"image": img.id, "label": img.id, "tag": FINAL, "version": fin.version.version, "review": str(fin.out)}
    if to_bank:
        out["bank"] = await _add_to_bank(state, ds, fin, vol, lab, classes)
    return out


async def _add_to_bank(state: IngressState, ds: Datastore, fin, vol, lab: np.ndarray, classes: list[dict]) -> dict:
    """The correction as templates (one per slice with foreground), encoded by a replica; a new bank version."""
    table = [{"index": c["index"], "name": c["name"]} for c in classes]
    case = re.sub(r"[^A-Za-z0-9_-]", "-", f"ml-{fin.review.case_id}")[:40] + f"-v{fin.version.version}"
    res = await state.call("add_templates", vol.image.astype(np.float32), lab, table, case, case)
    if "error" in res:
        raise bad(f"the label was saved (version {fin.version.version}) but not added to the bank: {res['error']}", 409)
    state.forget_classes()
    await asyncio.to_thread(ds.mark_in_bank, fin, int(res["version"]))
    return {"version": int(res["version"]), "added": len(res.get("added", []))}


@router.get("/datastore/label", summary="MONAI Label: download a label", responses={**_DS, 200: {"content": {"application/gzip": {}}}})
async def download_label(label: str, tag: str, facade: Facade = Depends(get_facade)):
    path = await _ds_call(facade.ds().label_file, label, tag)
    return FileResponse(path, media_type="application/gzip", filename=f"{label}.nii.gz")


@router.head("/datastore/label", summary="MONAI Label: does a label exist", responses=_DS)
async def check_label(image: str, tag: str, facade: Facade = Depends(get_facade)):
    await _ds_call(facade.ds().label_file, image, tag)
    return {}


@router.delete("/datastore/label", summary="MONAI Label: remove a label", responses=_DS)
async def remove_label(id: str, tag: str, facade: Facade = Depends(get_facade)):
    await _ds_call(facade.ds().remove_label, id, tag)
    return {}


@router.get("/datastore/label/info", summary="MONAI Label: a label's info", responses=_DS)
async def label_info(label: str, tag: str, facade: Facade = Depends(get_facade)):
    return await _ds_call(facade.ds().label_info, label, tag)


@router.put("/datastore/label/info", summary="MONAI Label: update a label's info", responses=_DS)
async def put_label_info(label: str, tag: str, info: str = Form("{}"), facade: Facade = Depends(get_facade)):
    return await _ds_call(facade.ds().update_label_info, label, tag, _params(info, "info"))


# ------------------------------------------------------------------------------------- active learning
@router.post("/activelearning/{strategy}", summary="MONAI Label: the next image to look at", responses=_DS)
async def activelearning(
    strategy: str, params: dict | None = Body(None), facade: Facade = Depends(get_facade)
) -> dict:
    if strategy not in STRATEGIES:
        raise bad(f"no strategy {strategy!r}: this server has {list(STRATEGIES)}", 404)
    ds = facade.ds()
    client_id = (params or {}).get("client_id")
    client_id = str(client_id)[:128] if client_id is not None else None
    img = await _ds_call(next_sample, strategy, ds, facade.descriptors, facade.handed, client_id)
    if img is None:
        return {}
    info = await _ds_call(ds.image_info, img)
    return {**info, "id": img.id, "name": img.id + img.ext, "path": str(img.path), "strategy": strategy}


# ------------------------------------------------------------------------------------------------ auth
@router.get("/auth/", summary="MONAI Label: is auth on (VESSA_API_TOKEN)", responses=error_responses(TEXT, 401))
@router.get("/auth", include_in_schema=False)
async def auth(state: IngressState = Depends(get_state)) -> dict:
    return {"enabled": bool(state.settings.api_token), "client_id": "vessa", "realm": None}


@router.post("/auth/token", summary="MONAI Label: log in; the password is VESSA's API token", responses=error_responses(TEXT, 401))
async def auth_token(
    username: str = Form(""), password: str = Form(""), state: IngressState = Depends(get_state)
):
    token = state.settings.api_token
    if not token:
        return {"access_token": None, "token_type": None}
    if not hmac.compare_digest(password.encode(), token.encode()):
        return JSONResponse(
            status_code=401, content={"detail": "wrong token: log in with VESSA's API token as the password"}
        )
    return {"access_token": token, "token_type": "Bearer"}


@router.get("/auth/token/valid", summary="MONAI Label: is the bearer token valid", responses=error_responses(TEXT, 401))
async def auth_token_valid() -> dict:
    # the guard middleware has checked the token before this runs
    return {"username": "vessa", "email": None, "name": "VESSA API token", "roles": ["monailabel-admin"]}


# ----------------------------------------------------------------------------------------------- train
@router.get("/train/", summary="MONAI Label: the training task's status (404 when there is none)", responses=error_responses(TEXT, 400, 401, 404, 409, 429, 503, 504))
@router.get("/train", include_in_schema=False)
async def train_status(check_if_running: bool = False, all: bool = False, facade: Facade = Depends(get_facade)):
    run: TrainRun | None = facade.train_run
    if run is not None:
        await _refresh(run)
    if check_if_running:
        if run is None or run.status != "RUNNING":
            raise bad("no training task is running", 404)
        return run.as_json()
    if run is None:
        raise bad("no training task has run on this server", 404)
    return [run.as_json()] if all else run.as_json()


@router.post("/train/{model}", summary="MONAI Label: corrected cases into the bank, then a short Stage-1 fine-tune (a Ray actor)", responses=error_responses(TEXT, 400, 401, 404, 409, 429, 503, 504))
@router.post("/train/", include_in_schema=False)
async def train_start(
    model: str = MODEL,
    params: dict | None = Body(None),
    state: IngressState = Depends(get_state),
    facade: Facade = Depends(get_facade),
):
    if model != MODEL:
        raise bad(f"no trainer {model!r}: this server has {[MODEL]}", 404)
    ds = facade.ds()
    run: TrainRun | None = facade.train_run
    if run is not None and run.status == "RUNNING":
        raise bad(f"training task {run.id} is already running", 429)
    try:
        fine = parse_params(params)
    except ValueError as exc:
        raise bad(str(exc)) from None
    try:
        from ray import serve

        app_name = serve.get_replica_context().app_name
    except Exception:
        raise bad("training needs the ingress to run under Ray Serve", 503) from None
    classes = await state.classes()
    run = TrainRun(params=fine)
    run.paths = run_paths(ds.store, run.id)
    paths = {"root": ds.root, "data_root": ds.data_root, "store": ds.store, "job_root": ds.job_root}
    run.actor = FineTuner.remote(
        run.id, app_name, {k: str(v) if v else None for k, v in paths.items()},
        state.settings.limits.model_dump(), classes, fine,
    )  # fmt: skip
    facade.train_run = run
    run.task = asyncio.create_task(_supervise(run, state, facade))
    return run.as_json()


async def _supervise(run: TrainRun, state: IngressState, facade: Facade) -> None:
    """Waits for the actor (no work here), then has every replica serve the new checkpoint."""
    import ray

    try:
        out = await run.actor.go.remote()
        await _refresh(run)
        if out["status"] != "DONE":
            run.status, run.error = "ERROR", out.get("error")
            return
        run.phase = "serve"
        state.forget_classes()
        res = await state.call("use_model", out["ckpt"], timeout=max(60.0, state.settings.request_timeout_s))
        if "error" in res:
            run.status, run.error = "ERROR", res["error"]
            return
        run.result = {**run.result, "model": res["model"], "checkpoint": Path(out["ckpt"]).name}
        run.details.append(f"serving {res['model']}")
        if facade.versions:  # GET /info/ names the model now served
            facade.versions = {**facade.versions, "model_version": res["model"]}
        run.status = "DONE"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the actor died or a replica failed: reported in the status
        run.status, run.error = "ERROR", f"{type(exc).__name__}: {exc}"
        run.details.append(run.error)
    finally:
        if run.status != "RUNNING":
            run.end_ts = time.time()
        if run.actor is not None and run.status != "RUNNING":
            ray.kill(run.actor)
            run.actor = None


async def _refresh(run: TrainRun) -> None:
    """The actor's progress into the run (a short wait: a busy actor must not hold up a status poll)."""
    if run.actor is None or run.status != "RUNNING" or run.phase == "serve":
        return
    try:
        run.update(await asyncio.wait_for(run.actor.status.remote(), 5))
    except Exception:  # the actor is gone or busy: the last progress stands
        pass


@router.delete("/train/", summary="MONAI Label: stop the training task (its actor is killed, nothing it wrote is kept)", responses=error_responses(TEXT, 400, 401, 404, 409, 429, 503, 504))
@router.delete("/train", include_in_schema=False)
async def train_stop(facade: Facade = Depends(get_facade)):
    import ray

    run: TrainRun | None = facade.train_run
    if run is None or run.status != "RUNNING":
        return {}
    if run.phase == "serve":  # the checkpoint is finished and being loaded: that ends by itself
        await asyncio.wait({run.task}, timeout=120)
        return run.as_json()
    run.stop = True
    await _refresh(run)
    if run.task is not None:
        run.task.cancel()
    if run.actor is not None:
        ray.kill(run.actor)
        run.actor = None
    await asyncio.to_thread(remove_run, run.paths)
    run.status, run.end_ts = "STOPPED", time.time()
    run.details.append("stopped: nothing of this run was kept")
    return run.as_json()

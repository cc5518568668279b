"""`AssistantClient` and `AsyncAssistantClient`: the REST API from Python (httpx).

    client = AssistantClient("http://localhost:8000", token=None)
    result = client.pseudo_labels("case.nii.gz")          # NIfTI in → result.nifti (bytes), result.labels
    result = client.pseudo_labels(slices_bhw)              # numpy (B, H, W) → result.labels (B, H, W)
    mask, conf = client.segment(image_hw, "LV", box=[x0, y0, x1, y1])
    job = client.label_dataset("study")                     # a labeling job (docs/jobs.md) → job id
    client.wait_job(job["job_id"]); client.job_ranking(job["job_id"])

Errors come back as `AssistantAPIError` with the HTTP status and the server's message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import httpx
import numpy as np

from shared.wire.arrays import read_npy, write_npy


class AssistantAPIError(RuntimeError):
    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass
class PseudoLabels:
    """meta: the JSON part (confidence per slice and class, versions, timing); labels: the label map as a
    numpy array; nifti: the returned NIfTI bytes (NIfTI input only); probs: (B, C, H, W) uint8 p·255."""

    meta: dict
    labels: np.ndarray
    nifti: bytes | None = None
    probs: np.ndarray | None = None
    headers: dict = field(default_factory=dict)


def parse_multipart(response: httpx.Response) -> tuple[dict, bytes, str]:
    """(JSON part, file part bytes, file name) of a multipart/mixed response."""
    ctype = response.headers.get("content-type", "")
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + response.content
    )
    parts = list(msg.iter_parts())
    if len(parts) != 2:
        raise AssistantAPIError(
            response.status_code, f"expected a 2-part multipart response, got {len(parts)} parts"
        )
    meta = json.loads(parts[0].get_payload(decode=True))
    return meta, parts[1].get_payload(decode=True), parts[1].get_filename() or ""


def _file_arg(data, name: str) -> tuple[str, bytes]:
    if isinstance(data, (str, Path)):
        p = Path(data)
        return p.name, p.read_bytes()
    if isinstance(data, np.ndarray):
        return name + ".npy", write_npy(data)
    return name, bytes(data)


def _check(r: httpx.Response) -> httpx.Response:
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except Exception:
            detail = r.text
        raise AssistantAPIError(r.status_code, str(detail))
    return r


def _job_request(data: str, cases, selection, classes, **options) -> dict:
    body = {"data": str(data), "selection": selection, **{k: v for k, v in options.items() if v is not None}}
    if cases is not None:
        body["cases"] = list(cases)
    if classes is not None:
        body["classes"] = [int(c) for c in classes]
    return body


def _pl_request(image, probs, classes, axis, return_probs) -> tuple[dict, dict]:
    files = {"file": _file_arg(image, "slices")}
    if probs is not None:
        files["probs"] = _file_arg(probs, "probs")
    data = {}
    if classes is not None:
        data["classes"] = ",".join(str(c) for c in classes) if not isinstance(classes, str) else classes
    if axis is not None:
        data["axis"] = str(axis)
    if return_probs:
        data["return_probs"] = "true"
    return files, data


def _pl_result(r: httpx.Response) -> PseudoLabels:
    meta, payload, name = parse_multipart(_check(r))
    headers = {k: v for k, v in r.headers.items() if k.lower().startswith("x-vessa")}
    if name.endswith(".npy"):
        arr = read_npy(payload)
        if "layout" in meta:  # labels + probabilities in one array
            return PseudoLabels(meta, arr[:, 0], probs=arr[:, 1:], headers=headers)
        return PseudoLabels(meta, arr, headers=headers)
    from services.ingress.uploads import read_nifti_array

    arr, _, _ = read_nifti_array(payload)
    return PseudoLabels(meta, np.asarray(arr), nifti=payload, headers=headers)


def _seg_request(image, cls, points, point_labels, box, mask) -> tuple[dict, dict]:
    prompt = {"class": cls}
    if points is not None:
        prompt["points"] = np.asarray(points).tolist()
        prompt["point_labels"] = np.asarray(
            point_labels if point_labels is not None else [1] * len(points)
        ).tolist()
    if box is not None:
        prompt["box"] = [float(v) for v in box]
    files = {"image": _file_arg(image, "image")}
    if mask is not None:
        files["mask"] = _file_arg(np.asarray(mask, dtype=np.float32), "mask")
    return files, {"prompt": json.dumps(prompt)}


def _seg_result(r: httpx.Response) -> tuple[np.ndarray, float]:
    meta, payload, _ = parse_multipart(_check(r))
    return read_npy(payload).astype(bool), float(meta["confidence"])


def _template_request(image, label, classes, case_id, patient_id) -> tuple[dict, dict]:
    files = {"image": _file_arg(image, "image"), "label": _file_arg(label, "label")}
    data = {"classes": json.dumps(classes), "case_id": case_id}
    if patient_id:
        data["patient_id"] = patient_id
    return files, data


class AssistantClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 300.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def pseudo_labels(
        self, image, probs=None, classes=None, axis: int | None = None, return_probs: bool = False
    ) -> PseudoLabels:
        """image: a NIfTI path/bytes or a numpy (B, H, W)/(H, W) array; probs: (B, C, H, W) or 4D NIfTI."""
        files, data = _pl_request(image, probs, classes, axis, return_probs)
        return _pl_result(self.http.post("/v1/pseudo-labels", files=files, data=data))

    def segment(
        self, image: np.ndarray, cls, points=None, point_labels=None, box=None, mask=None
    ) -> tuple[np.ndarray, float]:
        files, data = _seg_request(image, cls, points, point_labels, box, mask)
        return _seg_result(self.http.post("/v1/segment", files=files, data=data))

    def templates(self) -> dict:
        return _check(self.http.get("/v1/templates")).json()

    def add_template(
        self, image, label, classes: list[dict], case_id: str, patient_id: str | None = None
    ) -> dict:
        files, data = _template_request(image, label, classes, case_id, patient_id)
        return _check(self.http.post("/v1/templates", files=files, data=data)).json()

    def remove_template(self, template_id: str) -> dict:
        return _check(self.http.delete(f"/v1/templates/{template_id}")).json()

    def info(self) -> dict:
        return _check(self.http.get("/v1/info")).json()

    def ready(self) -> bool:
        return self.http.get("/readyz").status_code == 200

    # -- labeling jobs (docs/jobs.md) ----------------------------------------------------------------
    def label_dataset(
        self, data: str, cases=None, selection: str = "unlabeled", classes=None, **options
    ) -> dict:
        """Start a job over the dataset `data` (relative to the service's data root) → {job_id, state,
        data, out}. options: probs (also write per-class probabilities), batch_slices, max_in_flight,
        cases_in_flight."""
        body = _job_request(data, cases, selection, classes, **options)
        return _check(self.http.post("/v1/jobs", json=body)).json()

    def job(self, job_id: str) -> dict:
        return _check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def jobs(self, limit: int = 100) -> list[dict]:
        return _check(self.http.get("/v1/jobs", params={"limit": limit})).json()["jobs"]

    def cancel_job(self, job_id: str) -> dict:
        return _check(self.http.delete(f"/v1/jobs/{job_id}")).json()

    def job_ranking(self, job_id: str) -> dict:
        return _check(self.http.get(f"/v1/jobs/{job_id}/ranking")).json()

    def wait_job(self, job_id: str, timeout: float = 3600.0, poll_s: float = 1.0) -> dict:
        """Poll until the job is done, failed or cancelled; TimeoutError after `timeout` seconds."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(poll_s)

    # review (docs/review.md)
    def job_cases(self, job_id: str) -> dict:
        """The job's cases, least trusted first, with review states."""
        return _check(self.http.get(f"/v1/jobs/{job_id}/cases")).json()

    def review_case(self, job_id: str, case_id: str, state: str, comment: str = "") -> dict:
        """state: approved, rejected or flagged."""
        body = {"state": state, "comment": comment}
        return _check(self.http.post(f"/v1/jobs/{job_id}/cases/{case_id}/review", json=body)).json()

    def upload_label(self, job_id: str, case_id: str, nifti: bytes | str, comment: str = "") -> dict:
        """A corrected label map (NIfTI bytes or a path) for the case: its next reviewed version."""
        data = nifti if isinstance(nifti, bytes) else open(nifti, "rb").read()
        files = {"file": ("label.nii.gz", data, "application/gzip")}
        return _check(self.http.post(f"/v1/jobs/{job_id}/cases/{case_id}/label", files=files, data={"comment": comment})).json()

    def add_job_to_bank(self, job_id: str, cases: list[str] | None = None) -> dict:
        """Approved and corrected cases of the job into the template bank → {added, skipped, bank_version}."""
        return _check(self.http.post(f"/v1/jobs/{job_id}/bank", json={"cases": cases} if cases else {})).json()

    def close(self) -> None:
        self.http.close()


class AsyncAssistantClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 300.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)

    async def pseudo_labels(
        self, image, probs=None, classes=None, axis: int | None = None, return_probs: bool = False
    ) -> PseudoLabels:
        files, data = _pl_request(image, probs, classes, axis, return_probs)
        return _pl_result(await self.http.post("/v1/pseudo-labels", files=files, data=data))

    async def segment(
        self, image: np.ndarray, cls, points=None, point_labels=None, box=None, mask=None
    ) -> tuple[np.ndarray, float]:
        files, data = _seg_request(image, cls, points, point_labels, box, mask)
        return _seg_result(await self.http.post("/v1/segment", files=files, data=data))

    async def templates(self) -> dict:
        return _check(await self.http.get("/v1/templates")).json()

    async def add_template(
        self, image, label, classes: list[dict], case_id: str, patient_id: str | None = None
    ) -> dict:
        files, data = _template_request(image, label, classes, case_id, patient_id)
        return _check(await self.http.post("/v1/templates", files=files, data=data)).json()

    async def remove_template(self, template_id: str) -> dict:
        return _check(await self.http.delete(f"/v1/templates/{template_id}")).json()

    async def info(self) -> dict:
        return _check(await self.http.get("/v1/info")).json()

    async def ready(self) -> bool:
        return (await self.http.get("/readyz")).status_code == 200

    async def aclose(self) -> None:
        await self.http.aclose()

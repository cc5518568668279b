"""A PACS as a labeling job's source and sink, over DICOMweb (dicomweb-client):

- QIDO-RS finds a study's series (`GET {url}/studies/{study}/series`);
- WADO-RS fetches each series' instances (`GET {url}/studies/{study}/series/{series}`, multipart) into a
  local folder, which the job then reads like any DICOM folder (shared/data/dicom_series.py);
- STOW-RS stores the job's DICOM-SEG results back (`POST {url}/studies`).

Credentials come from the environment, never from the command line or a log: `VESSA_DICOMWEB_TOKEN`
(a bearer token) or `VESSA_DICOMWEB_USER` + `VESSA_DICOMWEB_PASSWORD` (HTTP basic). A URL with a user
or password in it is refused, so they cannot end up in a job's state, manifest or log line.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pydicom

from services.labeling.outputs import write_atomic

ENV_TOKEN = "VESSA_DICOMWEB_TOKEN"
ENV_USER = "VESSA_DICOMWEB_USER"
ENV_PASSWORD = "VESSA_DICOMWEB_PASSWORD"

_SERIES_UID = "0020000E"
_MODALITY = "00080060"


class DicomWebError(RuntimeError):
    """The PACS refused or failed a request (the message names the request, never the credentials)."""


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a DICOMweb URL (http[s]://host/…): {url!r}")
    if parts.username or parts.password:
        raise ValueError(f"put the PACS credentials in {ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN}, not in the URL")
    return url.rstrip("/")


def connect(url: str, timeout: float = 60.0):
    """A DICOMweb client for `url`, authenticated from the environment."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    headers = {}
    token = os.environ.get(ENV_TOKEN)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif os.environ.get(ENV_USER):
        session.auth = (os.environ[ENV_USER], os.environ.get(ENV_PASSWORD, ""))
    return DICOMwebClient(check_url(url), session=session, headers=headers or None, timeout=timeout)


def _value(item: dict, tag: str) -> str:
    vals = (item.get(tag) or {}).get("Value") or [""]
    return str(vals[0])


def _call(what: str, fn, *args, **kwargs):
    import requests

    try:
        return fn(*args, **kwargs)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise DicomWebError(f"DICOMweb {what}: HTTP {status}") from None
    except requests.RequestException as exc:
        raise DicomWebError(f"DICOMweb {what}: {type(exc).__name__}") from None


def find_series(client, study_uid: str) -> list[tuple[str, str]]:
    """(series UID, modality) of every series of the study (QIDO-RS)."""
    found = _call(f"QIDO-RS series of study {study_uid}", client.search_for_series, study_instance_uid=study_uid)
    return [(_value(s, _SERIES_UID), _value(s, _MODALITY)) for s in found if _value(s, _SERIES_UID)]


def fetch_study(url: str, study_uid: str, dest: str | Path, series_uid: str | None = None) -> list[str]:
    """The study's series (or only `series_uid`) fetched with WADO-RS into `dest/<series>/<sop>.dcm`;
    returns the series fetched. Series of VESSA's own results (SEG) are left on the PACS. Instances
    already in `dest` are not fetched again."""
    client = connect(url)
    dest = Path(dest)
    series = find_series(client, study_uid)
    if not series:
        raise DicomWebError(f"DICOMweb: no study {study_uid} (or no series in it) on {check_url(url)}")
    if series_uid is not None:
        series = [s for s in series if s[0] == series_uid]
        if not series:
            raise DicomWebError(f"DICOMweb: study {study_uid} has no series {series_uid}")
    fetched = []
    for uid, modality in series:
        if modality == "SEG":
            continue
        instances = _call(f"WADO-RS series {uid}", client.retrieve_series, study_uid, uid)
        for ds in instances:
            path = dest / uid / f"{ds.SOPInstanceUID}.dcm"
            if path.is_file():
                continue
            import io

            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            write_atomic(path, buf.getvalue())
        fetched.append(uid)
    return fetched


def store(url: str, paths: list[Path]) -> int:
    """Store DICOM files (the job's SEGs) on the PACS with STOW-RS; returns how many."""
    if not paths:
        return 0
    client = connect(url)
    datasets = [pydicom.dcmread(p) for p in paths]
    study = {str(ds.StudyInstanceUID) for ds in datasets}
    for uid in sorted(study):
        part = [ds for ds in datasets if ds.StudyInstanceUID == uid]
        _call(f"STOW-RS to study {uid}", client.store_instances, part, uid)
    return len(datasets)


def retrieve_series(url: str, study_uid: str, series_uid: str) -> list[pydicom.Dataset]:
    """The instances of one series (WADO-RS): e.g. a SEG stored by `store`, read back."""
    client = connect(url)
    return list(_call(f"WADO-RS series {series_uid}", client.retrieve_series, study_uid, series_uid))

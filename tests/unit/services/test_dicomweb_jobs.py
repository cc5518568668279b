"""A job whose source is a study on a PACS (JobSpec.dicomweb): what the spec accepts, and which PACS
the ingress lets a client name (VESSA_DICOMWEB_ALLOWED) — the rest of the path runs against a real
Orthanc in tests/integration/test_dicomweb.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import HTTPException
from pydantic import ValidationError

from services.ingress.routes.jobs import _accepted
from services.ingress.settings import ApiSettings
from shared.jobs import JobSpec

PACS = "http://pacs.example:8042/dicom-web"


def _state(tmp_path, allowed: str):
    settings = ApiSettings(data_root=str(tmp_path), job_output_root=str(tmp_path / "out"), dicomweb_allowed=allowed)
    return SimpleNamespace(settings=settings)


def test_spec_checks_the_source() -> None:
    with pytest.raises(ValidationError, match="needs data"):
        JobSpec()
    with pytest.raises(ValidationError, match="not in the url"):
        JobSpec(dicomweb={"url": "http://u:secret@pacs/dicom-web", "study": "1.2.3"})
    with pytest.raises(ValidationError, match="not a DICOM UID"):
        JobSpec(dicomweb={"url": PACS, "study": "1.2.3/../x"})
    spec = JobSpec(dicomweb={"url": PACS + "/", "study": "1.2.3", "store_seg": True})
    assert spec.dicomweb.url == PACS and spec.data == ""


def test_ingress_reads_only_allowed_pacs(tmp_path) -> None:
    body = JobSpec(dicomweb={"url": PACS, "study": "1.2.3"})
    with pytest.raises(HTTPException) as err:
        _accepted(body, "0123456789ab", _state(tmp_path, ""))
    assert err.value.status_code == 400 and "VESSA_DICOMWEB_ALLOWED" in err.value.detail
    with pytest.raises(HTTPException):  # a prefix of the host name is not the host
        _accepted(JobSpec(dicomweb={"url": "http://pacs.example:8042/dicom-web-evil", "study": "1"}), "0123456789ab", _state(tmp_path, PACS))
    spec = _accepted(body, "0123456789ab", _state(tmp_path, f"http://other, {PACS}"))
    out = tmp_path.resolve() / "out" / "0123456789ab"
    assert spec.out == str(out) and spec.data == str(out / "dicomweb" / "1.2.3")
    with pytest.raises(HTTPException, match="not both"):
        _accepted(JobSpec(data="x", dicomweb={"url": PACS, "study": "1"}), "0123456789ab", _state(tmp_path, PACS))

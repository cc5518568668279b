"""A study labeled straight from a PACS: a real Orthanc with its DICOMweb plugin (started on free ports
with a temporary config), real redis-server, dispatcher and Serve app. The study goes in with STOW-RS,
`vessa label --dicomweb URL --study UID --store-seg` finds its series (QIDO-RS), fetches them (WADO-RS),
labels them and stores the SEGs back (STOW-RS); the SEG read back from Orthanc says what the NIfTI VESSA
wrote says. Credentials come from the environment and appear nowhere in the outputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from services.cli.main import run as vessa
from services.labeling import dicomweb
from services.labeling.cases import discover, read_case
from services.labeling.outputs import read_manifest
from shared.data.dicom_seg import read_seg_labelmap
from shared.data.dicom_write import write_dicom_series
from shared.data.synth import synth_case
from tests.helpers import start_dispatcher, stop_process
from tests.orthanc import OrthancServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture
def dispatcher(serve_app, redis_server, tmp_path):
    proc = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d.log")
    yield proc
    stop_process(proc)


@pytest.fixture
def pacs_env(orthanc, monkeypatch):
    monkeypatch.delenv(dicomweb.ENV_TOKEN, raising=False)
    monkeypatch.setenv(dicomweb.ENV_USER, orthanc.user)
    monkeypatch.setenv(dicomweb.ENV_PASSWORD, orthanc.password)
    return orthanc


def _upload_study(url: str, tmp_path: Path) -> tuple[str, list[str]]:
    study = generate_uid()
    files, series = [], []
    for i, kw in ((1, {}), (2, {"transfer_syntax": RLELossless})):
        c = synth_case(0, i)
        written = write_dicom_series(c.image[:3], c.spacing, tmp_path / "study" / str(i), study_uid=study, series_number=i, **kw)
        series.append(str(pydicom.dcmread(written[0]).SeriesInstanceUID))
        files += written
    assert dicomweb.store(url, files) == len(files)  # STOW-RS
    return study, series


def test_credentials_from_the_environment_only(orthanc, monkeypatch):
    for key in (dicomweb.ENV_TOKEN, dicomweb.ENV_USER, dicomweb.ENV_PASSWORD):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(dicomweb.DicomWebError, match="HTTP 401"):
        dicomweb.find_series(dicomweb.connect(orthanc.dicomweb), generate_uid())
    with pytest.raises(ValueError, match="not in the URL"):
        dicomweb.connect(f"http://{orthanc.user}:{orthanc.password}@127.0.0.1:{orthanc.http_port}/dicom-web")
    assert vessa(["label", "--dicomweb", f"http://u:p@127.0.0.1:{orthanc.http_port}/dicom-web", "--study", "1.2", "--out", "x"]) == 2


def test_dicomweb_round_trip(serve_app, redis_server, dispatcher, pacs_env, tmp_path, capsys):
    orthanc_url = pacs_env.dicomweb
    study, series = _upload_study(orthanc_url, tmp_path)
    assert sorted(uid for uid, _ in dicomweb.find_series(dicomweb.connect(orthanc_url), study)) == sorted(series)
    out = tmp_path / "out"
    code = vessa(["label", "--dicomweb", orthanc_url, "--study", study, "--out", str(out), "--redis", redis_server.url, "--all", "--store-seg", "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "stored 2 DICOM-SEG" in printed.out
    manifest = read_manifest(out)
    assert manifest["counts"] == {"cases": 2, "ok": 2, "failed": 0}
    # the study on the PACS now holds two SEG series, each referencing one of the source series
    on_pacs = dicomweb.find_series(dicomweb.connect(orthanc_url), study)
    segs = [uid for uid, modality in on_pacs if modality == "SEG"]
    assert len(segs) == 2
    cases = {c.case_id: c for c in discover(out / "dicomweb" / study).cases}
    for seg_uid in segs:
        (seg_ds,) = dicomweb.retrieve_series(orthanc_url, study, seg_uid)
        source_uid = str(seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID)
        vol = read_case(cases[source_uid])
        rec = next(c for c in manifest["cases"] if c["case_id"] == source_uid)
        nii = nib.load(out / rec["output"])
        vessa_label = np.transpose(np.asarray(nii.dataobj), (2, 1, 0))
        path = tmp_path / f"{seg_uid}.dcm"
        seg_ds.save_as(path, enforce_file_format=True)
        back, _ = read_seg_labelmap(path, vol)
        assert np.array_equal(back, vessa_label)  # what the PACS holds is what VESSA wrote
    # the password is in no output VESSA wrote, nor in what it printed
    secret = pacs_env.password
    assert secret not in printed.out + printed.err
    for p in out.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".csv"):
            assert secret not in p.read_text()

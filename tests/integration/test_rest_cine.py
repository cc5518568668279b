"""`POST /v1/pseudo-labels` with a 4D cine or a zip of one DICOM series, over real HTTP against the
session's real Serve app. A cine is labeled frame by frame into a 4D label map in the input's
geometry, each frame exactly what the same frame sent alone as a 3D volume gets; student
probabilities with a cine are a 400. A DICOM series gets its label map in the series' scanner
geometry (or a DICOM-SEG), and a zip that is not one image series is a 400 naming why."""

from __future__ import annotations

import io
import zipfile

import httpx
import nibabel as nib
import numpy as np
import pytest

from services.ingress.client import AssistantClient
from services.ingress.uploads import read_nifti_array
from shared.data.cine import synth_cine

pytestmark = pytest.mark.slow


def test_cine_over_rest(serve_app) -> None:
    image, _, _, affine = synth_cine(0, 2, frames=3, depth=3)
    xyzt = np.transpose(image, (2, 3, 1, 0))  # (T, D, H, W) → (x, y, z, t)
    img = nib.Nifti1Image(xyzt, affine)
    img.header.set_zooms((*np.abs(np.diag(affine)[:3]), 333.0))
    client = AssistantClient(serve_app.url, timeout=300)
    try:
        result = client.pseudo_labels(img.to_bytes())
        out, out_affine, _ = read_nifti_array(result.nifti)
        assert out.shape == xyzt.shape and np.allclose(out_affine, affine) and out.dtype == np.uint8
        assert result.meta["frames"] == 3 and len(result.meta["confidence"]) == 3
        assert all(len(c) == 3 for c in result.meta["confidence"])  # per frame, per slice
        for t in range(3):
            frame = nib.Nifti1Image(np.ascontiguousarray(xyzt[..., t]), affine)
            frame.header.set_zooms(np.abs(np.diag(affine)[:3]))
            alone = read_nifti_array(client.pseudo_labels(frame.to_bytes()).nifti)[0]
            assert np.array_equal(out[..., t], alone)
    finally:
        client.close()
    probs = np.zeros((*xyzt.shape[:3], 4), np.float32)
    r = httpx.post(
        serve_app.url + "/v1/pseudo-labels",
        files={"file": ("c.nii", img.to_bytes()), "probs": ("p.nii", nib.Nifti1Image(probs, affine).to_bytes())},
        timeout=120,
    )
    assert r.status_code == 400 and "4D cine" in r.json()["detail"]


def _zip_dir(folder) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*.dcm")):
            zf.writestr(str(p.relative_to(folder)), p.read_bytes())
    return buf.getvalue()


def test_dicom_series_zip_over_rest(serve_app, tmp_path) -> None:
    """A zip of one DICOM series: its label map in the series' scanner geometry, the same labels the
    same volume gets as a NIfTI; as a DICOM-SEG on request (read back equal); bad zips are a 400."""
    import pydicom

    from services.ingress.client import parse_multipart
    from shared.data.dicom_seg import read_seg_labelmap
    from shared.data.dicom_series import read_series, scan_folder
    from shared.data.dicom_write import write_dicom_series
    from shared.data.synth import synth_case

    case = synth_case(0, 1)
    write_dicom_series(case.image[:3], case.spacing, tmp_path / "a" / "series")
    data = _zip_dir(tmp_path / "a")
    (series,) = scan_folder(tmp_path / "a")
    vol = read_series(series)
    client = AssistantClient(serve_app.url, timeout=300)
    try:
        result = client.pseudo_labels(data, classes="1,2,3")
        out, out_affine, hdr = read_nifti_array(result.nifti)
        d, h, w = vol.image.shape
        assert out.shape == (w, h, d) and out.dtype == np.uint8 and np.allclose(out_affine, vol.affine)
        assert int(hdr["sform_code"]) == 1 and result.meta["series_uid"] == series.series_uid
        assert len(result.meta["confidence"]) == d
        label = np.transpose(out, (2, 1, 0))  # (slice, row, column)
        # the same slices (row, column) sent as a NIfTI volume get the same answer
        as_nifti = nib.Nifti1Image(np.transpose(vol.image, (1, 2, 0)), np.eye(4))
        alone = read_nifti_array(client.pseudo_labels(as_nifti.to_bytes(), classes="1,2,3", axis=2).nifti)[0]
        assert np.array_equal(label, np.transpose(alone, (2, 0, 1)))
    finally:
        client.close()
    url = serve_app.url + "/v1/pseudo-labels"
    r = httpx.post(url, params={"format": "dicom-seg"}, files={"file": ("s.zip", data)}, data={"classes": "1,2,3"}, timeout=300)
    assert r.status_code == 200, r.text
    meta, seg, name = parse_multipart(r)
    assert name == "labels.dcm" and meta["format"] == "dicom-seg"
    back, _ = read_seg_labelmap(seg, vol)
    assert np.array_equal(back, label)  # the SEG says what the NIfTI says
    assert str(pydicom.dcmread(io.BytesIO(seg)).ReferencedSeriesSequence[0].SeriesInstanceUID) == series.series_uid
    write_dicom_series(case.image[:3], case.spacing, tmp_path / "a" / "other", series_number=2)
    for kwargs, status, words in (
        ({"files": {"file": ("two.zip", _zip_dir(tmp_path / "a"))}}, 400, "holds 2 series"),
        ({"files": {"file": ("evil.zip", _zip_members({"../x.dcm": b"x"}))}}, 400, "leaves the folder"),
        ({"files": {"file": ("v.nii", as_nifti.to_bytes())}, "params": {"format": "dicom-seg"}}, 400, "needs a DICOM upload"),
        ({"files": {"file": ("s.zip", data)}, "params": {"format": "png"}}, 422, "format"),
    ):
        r = httpx.post(url, timeout=120, **kwargs)
        assert r.status_code == status and words in r.text, r.text


def _zip_members(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()

"""`POST /v1/pseudo-labels` with a 4D cine, over real HTTP against the session's real Serve app: labeled
frame by frame into a 4D label map in the input's geometry, each frame exactly what the same frame
sent alone as a 3D volume gets; student probabilities with a cine are a 400."""

from __future__ import annotations

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

"""4D cine (shared/data/cine.py): the beating synthetic heart, 4D NIfTI in as frames and labels out as
one 4D map in the input's geometry, and `vessa data synth --cine`."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.cli.main import run as vessa
from shared.data.cine import cine_labels_to_nifti, cycle_phase, load_cine_labels, load_cine_nifti, synth_cine
from shared.data.nifti import load_nifti, nifti_from_bytes


def test_synth_cine_beats() -> None:
    image, label, spacing, affine = synth_cine(0, 1, frames=6, depth=4)
    assert image.shape[:2] == (6, 4) and label.shape == image.shape and image.dtype == np.int16
    lv = (label == 3).sum(axis=(1, 2, 3))
    # end-diastole (t=0) has the largest LV cavity, end-systole (t=3) the smallest, and it comes back
    assert lv.argmax() == 0 and lv.argmin() == 3 and lv[3] < 0.8 * lv[0]
    assert lv[1] == lv[5] and lv[2] == lv[4]  # the cycle is symmetric
    assert cycle_phase(0, 6) == 0.0 and cycle_phase(3, 6) == pytest.approx(1.0)
    assert np.array_equal(image[0, :, :5, :5], image[3, :, :5, :5])  # only the heart moves (a corner)


def test_cine_nifti_round_trip(tmp_path: Path) -> None:
    assert vessa(["data", "synth", str(tmp_path), "--cases", "1", "--cine", "4"]) == 0
    src = tmp_path / "synth000_4d.nii.gz"
    with pytest.raises(ValueError, match="unsupported NIfTI dimensionality"):
        load_nifti(src)  # a 3D reader still refuses 4D
    frames = load_cine_nifti(src)
    img = nib.load(src)
    assert len(frames) == 4 and img.shape[3] == 4
    for t, f in enumerate(frames):
        assert f.case_id == f"synth000_4d_t{t:02d}" and f.meta["frame"] == t
        assert f.image.shape == (img.shape[2], img.shape[0], img.shape[1])  # slices first
        assert np.array_equal(f.image, np.transpose(np.asanyarray(img.dataobj)[..., t], (2, 0, 1)))
    truth = load_cine_labels(tmp_path / "truth" / "synth000_4d.nii.gz", frames)
    out = cine_labels_to_nifti(truth, frames)
    back = nifti_from_bytes(out.to_bytes(), allow_4d=True)
    assert back.shape == img.shape and back.get_data_dtype() == np.uint8
    assert np.allclose(back.affine, img.affine) and int(back.header["sform_code"]) == 1
    assert np.array_equal(np.asanyarray(back.dataobj), np.asanyarray(nib.load(tmp_path / "truth" / "synth000_4d.nii.gz").dataobj))
    assert back.header.get_zooms()[3] == pytest.approx(250.0)  # the time step is kept


def test_temporal_prompts_keep_the_wire_form_and_the_job_bounds_its_weight() -> None:
    from pydantic import ValidationError

    from shared.data.cine import temporal_blend, temporal_prompts
    from shared.jobs import JobSpec

    rng = np.random.default_rng(0)
    probs = [rng.integers(0, 256, (2, 4, 8, 8), dtype=np.uint8) for _ in range(3)]
    out = temporal_prompts(probs, 0.25)
    assert all(p.dtype == np.uint8 for p in out)
    assert np.array_equal(out[1], np.rint(temporal_blend(probs, 0.25)[1]).astype(np.uint8))
    floats = [p.astype(np.float32) / 255 for p in probs]
    assert temporal_prompts(floats, 0.25)[0].dtype == np.float32
    assert JobSpec(data="x").temporal_context == 0.0  # off by default
    for bad in (-0.1, 0.34, float("nan")):
        with pytest.raises(ValidationError, match="temporal_context"):
            JobSpec(data="x", temporal_context=bad)

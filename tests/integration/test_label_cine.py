"""A 4D synthetic cine labeled end to end (real redis-server, dispatcher and Serve app): one 4D label
map in the input's geometry, each frame scored against its ground truth, per-frame statistics in the
record, and a rerun that skips it."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.labeling.outputs import read_manifest
from services.labeling.runner import run_label_job
from services.labeling.scoring import score
from shared.data.cine import cine_dice, write_cine_dataset
from shared.jobs import JobSpec
from tests.helpers import start_dispatcher, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def dispatcher(serve_app, redis_server, tmp_path):
    proc = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d.log")
    yield proc
    stop_process(proc)


def test_cine_labeled_frame_by_frame(serve_app, redis_server, dispatcher, tmp_path: Path) -> None:
    data = tmp_path / "cine"
    (cid,) = write_cine_dataset(data, cases=1, frames=4, seed=0, depth=3)
    out = tmp_path / "out"
    summary = run_label_job(JobSpec(data=str(data), out=str(out), selection="all", class_names={1: "RV", 2: "Myo", 3: "LV"}), redis_server.url)
    assert summary.labeled == 1 and summary.failed == 0 and summary.slices == 4 * 3
    src = nib.load(data / f"{cid}.nii.gz")
    pred = nib.load(out / "labels" / f"{cid}.nii.gz")
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine) and pred.get_data_dtype() == np.uint8
    p = np.asarray(pred.dataobj)
    truth = np.asarray(nib.load(data / "truth" / f"{cid}.nii.gz").dataobj)
    scores = cine_dice(p, truth, [1, 2, 3])
    assert len(scores) == 4 and all(0.0 <= v <= 1.0 for s in scores for v in s.values())
    assert np.mean([s[3] for s in scores]) > 0.0  # the LV is found on some frame
    (rec,) = read_manifest(out)["cases"]
    assert [f["frame"] for f in rec["frames"]] == [0, 1, 2, 3] and rec["shape"][0] == 4
    for f in rec["frames"]:
        assert f["classes"]["LV"]["voxels"] == int((p[..., f["frame"]] == 3).sum())
    assert len(rec["slice_confidence"]) == 12
    # `vessa label score` scores every frame against the 4D ground truth, with the same Dice
    scored = score(out, data / "truth")
    assert [c["case_id"] for c in scored["cases"]] == [f"{cid}_t{t:02d}" for t in range(4)]
    for t, c in enumerate(scored["cases"]):
        assert c["classes"]["LV"]["dice"] == pytest.approx(scores[t][3])
        assert c["confidence"] == rec["frames"][t]["confidence"]
    again = run_label_job(JobSpec(data=str(data), out=str(out), selection="all"), redis_server.url)
    assert again.skipped == 1 and again.labeled == 0


def test_cine_with_temporal_context(serve_app, redis_server, dispatcher, tmp_path: Path) -> None:
    """`vessa label --temporal-context W`: a second pass per frame prompted with its neighbours in time;
    the same 4D label map geometry, the option in the manifest and the record, and a rerun without it
    labels the cine again (its labels came from another pass). A weight outside [0, 1/3] is a usage
    error."""
    from services.cli.main import run as vessa

    data = tmp_path / "cine"
    (cid,) = write_cine_dataset(data, cases=1, frames=3, seed=1, depth=2)
    out = tmp_path / "out"
    args = ["label", "--data", str(data), "--out", str(out), "--redis", redis_server.url, "--all", "--no-progress"]
    assert vessa([*args, "--temporal-context", "0.2"]) == 0
    src = nib.load(data / f"{cid}.nii.gz")
    pred = nib.load(out / "labels" / f"{cid}.nii.gz")
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine) and pred.get_data_dtype() == np.uint8
    manifest = read_manifest(out)
    assert manifest["job"]["temporal_context"] == 0.2
    (rec,) = manifest["cases"]
    assert rec["temporal_context"] == 0.2 and [f["frame"] for f in rec["frames"]] == [0, 1, 2]
    assert vessa([*args, "--temporal-context", "0.2"]) == 0 and read_manifest(out)["cases"][0]["run_id"] == rec["run_id"]
    assert vessa(args) == 0  # off: labeled again, recorded as 0
    assert read_manifest(out)["cases"][0]["temporal_context"] == 0.0
    for bad in ("0.5", "-0.1"):
        assert vessa([*args, "--temporal-context", bad]) == 2

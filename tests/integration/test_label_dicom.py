"""`vessa label` on a folder of DICOM series, end to end: real redis-server, a real dispatcher, the
session's real Serve app. Two good series (one single-frame JPEG-LS compressed, one enhanced
multi-frame), one broken series (a missing slice) and a structured report in the same folder: the
good ones are labeled into NIfTI and DICOM-SEG outputs that agree voxel for voxel, the others fail
with their reason, and nothing is half-written."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless

from services.cli.main import run as vessa
from services.labeling.cases import discover, read_case
from services.labeling.outputs import read_manifest
from services.labeling.runner import run_label_job
from shared.data.dicom_seg import read_seg_labelmap
from shared.data.dicom_write import write_dicom_series
from shared.data.synth import synth_case
from shared.jobs import JobSpec
from tests.helpers import start_dispatcher, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture
def dispatcher(serve_app, redis_server, tmp_path):
    proc = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d.log")
    yield proc
    stop_process(proc)


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A study folder: series A (compressed), B (enhanced), C (a slice missing), D (an SR)."""
    root = tmp_path_factory.mktemp("dicom_in")
    uids = {}
    for name, seed, kw in (("A", 1, {"transfer_syntax": JPEGLSLossless}), ("B", 2, {"enhanced": True})):
        case = synth_case(0, seed)
        files = write_dicom_series(case.image[:3], case.spacing, root / name, description=f"synthetic {name}", series_number=seed, **kw)
        uids[name] = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    case = synth_case(0, 3)
    files = write_dicom_series(case.image[:4], case.spacing, root / "C", series_number=3)
    files[1].unlink()
    uids["C"] = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    sr = pydicom.dcmread(files[0])
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.SeriesInstanceUID = uids["D"] = pydicom.uid.generate_uid()
    for key in ("PixelData", "Rows", "Columns"):
        delattr(sr, key)
    (root / "D").mkdir()
    sr.save_as(root / "D" / "report.dcm")
    return root, uids


def test_dicom_folder_labeled_into_nifti_and_seg(serve_app, redis_server, dispatcher, dicom_folder, tmp_path):
    root, uids = dicom_folder
    out = tmp_path / "out"
    names = {1: "RV", 2: "Myo", 3: "LV"}
    summary = run_label_job(JobSpec(data=str(root), out=str(out), selection="all", class_names=names), redis_server.url)
    assert summary.labeled == 2 and summary.failed == 2
    assert "missing slices" in summary.errors[uids["C"]]
    assert "not an image series" in summary.errors[uids["D"]] and "SR" in summary.errors[uids["D"]]
    found = {c.case_id: c for c in discover(root).cases}
    manifest = {c["case_id"]: c for c in read_manifest(out)["cases"]}
    for key in ("A", "B"):
        rec = manifest[uids[key]]
        assert rec["status"] == "ok" and set(rec["classes"]) == {"RV", "Myo", "LV"}
        vol = read_case(found[uids[key]])
        nii = nib.load(out / rec["output"])
        assert nii.shape == (vol.image.shape[2], vol.image.shape[1], vol.image.shape[0])
        assert np.allclose(nii.affine, vol.affine) and int(nii.header["sform_code"]) == 1
        label = np.transpose(np.asarray(nii.dataobj), (2, 1, 0))  # back to (slice, row, column)
        seg_label, seg_names = read_seg_labelmap(out / rec["seg_output"], vol)
        assert seg_names == {1: "RV", 2: "Myo", 3: "LV"}
        assert np.array_equal(seg_label, label)  # the SEG and the NIfTI say the same
        seg = pydicom.dcmread(out / rec["seg_output"])
        assert seg.SeriesInstanceUID != uids[key] and seg.StudyInstanceUID == vol.meta["dicom"].study_uid
        algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "VESSA" and rec["model_version"] in algo.AlgorithmVersion
    assert manifest[uids["C"]]["seg_output"] is None and not (out / "seg" / f"{uids['C']}.dcm").exists()
    assert not list(out.rglob(".*.tmp"))
    # a rerun labels nothing again: same series, same model and bank
    again = run_label_job(JobSpec(data=str(root), out=str(out), selection="all", class_names=names), redis_server.url)
    assert again.skipped == 2 and again.labeled == 0


def test_cli_series_picks_one(serve_app, redis_server, dispatcher, dicom_folder, tmp_path, capsys):
    root, uids = dicom_folder
    out = tmp_path / "one"
    code = vessa(["label", "--data", str(root), "--out", str(out), "--redis", redis_server.url, "--series", uids["B"], "--all", "--no-progress"])
    assert code == 0
    assert [p.name for p in (out / "seg").iterdir()] == [f"{uids['B']}.dcm"]
    code = vessa(["label", "--data", str(root), "--out", str(out), "--redis", redis_server.url, "--series", "1.2.3", "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "no series 1.2.3 in the folder" in err and uids["A"] in err


def test_dicom_cine_series_labeled_into_4d_nifti_and_a_seg_per_frame(serve_app, redis_server, dispatcher, tmp_path):
    """A DICOM cine (one instance per slice and temporal position) is one case: a 4D label map like a
    4D NIfTI's, one DICOM-SEG per frame that says what the NIfTI's frame says, each frame scored."""
    from services.labeling.cases import read_cine_case
    from shared.data.cine import cine_dice, load_cine_labels, synth_cine
    from shared.data.dicom_series import read_series_frames

    t_count, depth = 3, 3
    image, truth, spacing, _ = synth_cine(0, 1, frames=t_count, depth=depth)
    root = tmp_path / "cine_in"
    files = write_dicom_series(image, spacing, root / "cine", description="synthetic cine")
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert len(files) == t_count * depth
    out = tmp_path / "out"
    names = {1: "RV", 2: "Myo", 3: "LV"}
    summary = run_label_job(JobSpec(data=str(root), out=str(out), selection="all", class_names=names), redis_server.url)
    assert summary.labeled == 1 and summary.failed == 0 and summary.slices == t_count * depth, summary.errors
    (rec,) = read_manifest(out)["cases"]
    assert rec["case_id"] == uid and rec["shape"] == [t_count, depth, *image.shape[2:]] and rec["seg_output"] is None
    assert [f["frame"] for f in rec["frames"]] == list(range(t_count))
    (case,) = discover(root).cases
    frames = read_cine_case(case)
    nii = nib.load(out / rec["output"])
    assert nii.shape == (image.shape[3], image.shape[2], depth, t_count) and nii.get_data_dtype() == np.uint8
    assert np.allclose(nii.affine, frames[0].affine) and int(nii.header["sform_code"]) == 1
    labels = load_cine_labels(out / rec["output"], frames)
    for t, f in enumerate(rec["frames"]):
        assert f["seg_output"] == f"seg/{uid}_t{t:02d}.dcm"
        seg_label, seg_names = read_seg_labelmap(out / f["seg_output"], frames[t])
        assert seg_names == names and np.array_equal(seg_label, labels[t])  # the frame's SEG = the NIfTI's frame
        seg = pydicom.dcmread(out / f["seg_output"])
        refs = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        own = {str(d.SOPInstanceUID) for d in frames[t].meta["dicom"].datasets}
        assert refs <= own and len(own) == depth  # only this temporal position's instances
        assert f["classes"]["LV"]["voxels"] == int((labels[t] == 3).sum())
    # every frame scored against its ground truth, in the reader's slice order
    raw = read_series_frames(case.series)
    flip = not np.array_equal(raw[0].image, image[0].astype(np.float32))
    assert np.array_equal(raw[0].image, (image[0, ::-1] if flip else image[0]).astype(np.float32))
    truth_read = truth[:, ::-1] if flip else truth
    scores = cine_dice(np.stack(labels, -1), np.stack(list(truth_read), -1), [1, 2, 3])
    assert len(scores) == t_count and np.mean([s[3] for s in scores]) > 0.0  # the LV found on some frame
    again = run_label_job(JobSpec(data=str(root), out=str(out), selection="all", class_names=names), redis_server.url)
    assert again.skipped == 1 and again.labeled == 0
    (out / rec["frames"][1]["seg_output"]).unlink()  # a frame's SEG gone: the case is labeled again
    third = run_label_job(JobSpec(data=str(root), out=str(out), selection="all", class_names=names), redis_server.url)
    assert third.labeled == 1 and (out / rec["frames"][1]["seg_output"]).is_file()

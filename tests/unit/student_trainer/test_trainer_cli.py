"""`vessa train | eval | predict` through the root CLI, on tiny synthetic data (CPU)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from services.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic dataset and a checkpoint trained on it for a few iterations through `vessa train`."""
    from shared.data.synth import write_msd_dataset

    root = tmp_path_factory.mktemp("cli")
    data = root / "synth"
    write_msd_dataset(data, cases=6, seed=5)
    cfg = {
        "method": "supervised",
        "device": "cpu",
        "progress": False,
        "data": {"root": str(data), "n_labeled": 2, "image_size": 64},
        "batch_size": 4,
        "max_iters": 4,
        "val_every": 2,
        "save_every": 2,
        "final_eval": False,
    }
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = root / "run"
    res = runner.invoke(app, ["train", "--config", str(config), "--out-dir", str(out)])
    assert res.exit_code == 0, res.output
    return data, out


def test_train_show_config_applies_flags_and_sets(tmp_path):
    res = runner.invoke(
        app,
        [
            "train",
            "--config",
            "configs/train/acdc_bcp_3.yaml",
            "--max-iters",
            "7",
            "--set",
            "bcp.pretrain_iters=3",
            "--set",
            "vessa.fusion.tau=0.7",
            "--show-config",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["method"] == "bcp" and cfg["max_iters"] == 7
    assert cfg["bcp"]["pretrain_iters"] == 3 and cfg["vessa"]["fusion"]["tau"] == 0.7
    assert cfg["optim"]["schedule"] == "constant"


def test_all_configs_resolve():
    from pathlib import Path

    for path in sorted(Path("configs/train").glob("*.yaml")):
        res = runner.invoke(app, ["train", "--config", str(path), "--show-config"])
        assert res.exit_code == 0, f"{path}: {res.output}"


def test_eval_writes_metrics_and_nifti(trained, tmp_path):
    data, run = trained
    out = tmp_path / "eval"
    res = runner.invoke(
        app,
        ["eval", "--ckpt", str(run / "best.pt"), "--data", str(data), "--split", "val", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    assert "Dice" in res.output and "HD95" in res.output
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["volumes"]) == 2
    for vol in report["volumes"]:
        assert set(vol["classes"]) == {"RV", "Myo", "LV"}
        for metrics in vol["classes"].values():
            assert {"dice", "jaccard", "hd95", "asd"} <= set(metrics)
    assert set(report["summary"]["per_class"]) == {"RV", "Myo", "LV"}
    for vol in report["volumes"]:
        pred = nib.load(out / "predictions" / f"{vol['case_id']}.nii.gz")
        src = nib.load(data / "imagesTr" / f"{vol['case_id']}_0000.nii.gz")
        np.testing.assert_allclose(pred.affine, src.affine)
        assert pred.shape == src.shape and pred.get_data_dtype() == np.uint8


def test_predict_keeps_input_affine(trained, tmp_path):
    data, run = trained
    src_path = data / "imagesTr" / "synth005_0000.nii.gz"
    out = tmp_path / "pred.nii.gz"
    res = runner.invoke(app, ["predict", str(src_path), "--ckpt", str(run / "best.pt"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    pred, src = nib.load(out), nib.load(src_path)
    np.testing.assert_allclose(pred.affine, src.affine)
    assert pred.shape == src.shape
    assert pred.get_data_dtype() == np.uint8
    assert int(pred.header["qform_code"]) == int(src.header["qform_code"])
    values = np.unique(np.asarray(pred.dataobj))
    assert set(values.tolist()) <= {0, 1, 2, 3}


def test_eval_on_hdf5_layout_writes_identity_affine(trained, tmp_path):
    """HDF5 volumes carry no affine: predictions get an identity affine (unit spacing, as none is known)
    with slices on the last NIfTI axis."""
    from shared.data.synth import write_ssl4mis_layout

    _, run = trained
    h5 = tmp_path / "h5"
    lists = write_ssl4mis_layout(h5, cases=4, seed=1, val_cases=1)
    out = tmp_path / "eval_h5"
    res = runner.invoke(
        app, ["eval", "--ckpt", str(run / "best.pt"), "--data", str(h5), "--split", "val", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    case = lists["val"][0]
    pred = nib.load(out / "predictions" / f"{case}.nii.gz")
    np.testing.assert_allclose(pred.affine, np.eye(4))
    import h5py

    with h5py.File(h5 / "volumes" / f"{case}.h5") as f:
        d, h, w = f["image"].shape
    assert pred.shape == (h, w, d)


def test_predict_dicom_series_writes_nifti_and_seg(trained, tmp_path):
    """A folder of one DICOM series in: the label map in the series' scanner geometry, and with --seg a
    DICOM-SEG beside it that references the series and says what the NIfTI says."""
    import pydicom

    from shared.data.dicom_seg import read_seg_labelmap
    from shared.data.dicom_series import read_series, scan_folder
    from shared.data.dicom_write import write_dicom_series
    from shared.data.synth import synth_case

    data, run = trained
    case = synth_case(5, 1)
    write_dicom_series(case.image[:3], case.spacing, tmp_path / "dcm" / "a")
    (series,) = scan_folder(tmp_path / "dcm")
    vol = read_series(series)
    out = tmp_path / "pred" / "a.nii.gz"
    res = runner.invoke(app, ["predict", str(tmp_path / "dcm"), "--ckpt", str(run / "best.pt"), "-o", str(out), "--seg", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["series_uid"] == series.series_uid and summary["seg"] == str(tmp_path / "pred" / "a.dcm")
    pred = nib.load(out)
    d, h, w = vol.image.shape
    assert pred.shape == (w, h, d) and pred.get_data_dtype() == np.uint8
    np.testing.assert_allclose(pred.affine, vol.affine)
    label = np.transpose(np.asarray(pred.dataobj), (2, 1, 0))
    back, names = read_seg_labelmap(tmp_path / "pred" / "a.dcm", vol)
    assert np.array_equal(back, label) and set(names.values()) <= {"RV", "Myo", "LV"}
    ds = pydicom.dcmread(tmp_path / "pred" / "a.dcm")
    assert str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID) == series.series_uid
    # --seg with a NIfTI, and a folder of two series without --series, are refused with the reason
    nifti = data / "imagesTr" / "synth005_0000.nii.gz"
    res = runner.invoke(app, ["predict", str(nifti), "--ckpt", str(run / "best.pt"), "-o", str(tmp_path / "x.nii.gz"), "--seg"])
    assert res.exit_code == 2 and "DICOM folder" in res.output
    write_dicom_series(case.image[:3], case.spacing, tmp_path / "dcm" / "b", series_number=2)
    from services.cli.main import run as vessa

    assert vessa(["predict", str(tmp_path / "dcm"), "--ckpt", str(run / "best.pt"), "-o", str(tmp_path / "y.nii.gz")]) == 1

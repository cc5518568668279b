"""`vessa label rank` / `--suggest` / `score` on a labeling output built from known labels (no model
needed: the records and label maps are what `vessa label` writes, with confidences chosen so that the
expected order is known)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.cli.main import run
from services.labeling.outputs import CaseRecord, ClassStats, label_path, write_manifest, write_record
from services.labeling.ranking import ranking, suggest
from services.labeling.scoring import score

CLASSES = {1: "RV", 2: "Myo", 3: "LV"}


def _make_output(synth_dir: Path, out: Path, plan: dict[str, tuple[float, int]]) -> None:
    """plan: case → (confidence, erosion): the case's ground truth with `erosion` label slices blanked
    (worse labels for bigger erosion), written like `vessa label` writes them."""
    for case, (conf, blank) in plan.items():
        src = synth_dir / "labelsTr" / f"{case}.nii.gz"
        img = nib.load(src)
        lab = np.asanyarray(img.dataobj).astype(np.uint8).copy()
        if blank:
            lab[:, :, :blank] = 0  # the slices along the through-plane axis lose their labels
        dest = label_path(out, case)
        dest.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(lab, img.affine, img.header), dest)
        zooms = img.header.get_zooms()
        write_record(
            out,
            CaseRecord(
                case_id=case,
                status="ok",
                input=str(synth_dir / "imagesTr" / f"{case}_0000.nii.gz"),
                output=str(dest.relative_to(out)),
                slices=lab.shape[2],
                spacing=[float(zooms[2]), float(zooms[0]), float(zooms[1])],
                classes={n: ClassStats(index=i, confidence_mean=conf, confidence_worst=conf, voxels=int((lab == i).sum())) for i, n in CLASSES.items()},
                confidence=conf,
                model_version="m",
                bank_version=1,
            ),
        )
    write_manifest(out, {"job_id": "test"}, {})


@pytest.fixture
def output(synth_dir, tmp_path) -> Path:
    out = tmp_path / "out"
    _make_output(synth_dir, out, {"synth000": (0.9, 0), "synth001": (0.7, 2), "synth002": (0.5, 5), "synth003": (0.3, 8)})
    return out


def test_score_dice_and_spearman(output, synth_dir, capsys):
    result = score(output, synth_dir)
    by_case = {c["case_id"]: c for c in result["cases"]}
    assert by_case["synth000"]["mean_dice"] == pytest.approx(1.0)
    assert by_case["synth003"]["mean_dice"] < by_case["synth001"]["mean_dice"] < 1.0
    assert "hd95_mm" in by_case["synth001"]["classes"]["LV"]
    assert result["spearman_confidence_dice"] == pytest.approx(1.0)
    assert json.loads((output / "score.json").read_text())["spearman_confidence_dice"] == pytest.approx(1.0)
    assert run(["label", "score", str(output), "--truth", str(synth_dir)]) == 0
    assert "Spearman(confidence, Dice) = 1.000 over 4 cases" in capsys.readouterr().out


def test_score_without_truth_is_an_error(output, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(["label", "score", str(output), "--truth", str(empty)]) == 1
    assert "has a ground truth" in capsys.readouterr().err
    assert run(["label", "score", str(output), "--truth", str(tmp_path / "nope")]) == 2


def test_rank_least_trusted_first(output, capsys):
    from services.labeling.outputs import read_records

    order = [r["case_id"] for r in ranking(read_records(output))]
    assert order == ["synth003", "synth002", "synth001", "synth000"]
    assert run(["label", "rank", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:2] == ["1", "synth003"]


def test_suggest_trades_confidence_for_diversity(synth_dir, tmp_path):
    """Two near-copies of the least trusted case and a different, slightly more trusted one: the second
    pick is the different case, not the copy."""
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    img = nib.load(data / "imagesTr" / "synth000_0000.nii.gz")
    nib.save(img, data / "imagesTr" / "synth001_0000.nii.gz")  # synth001's image := synth000's
    shutil.copy(data / "labelsTr" / "synth000.nii.gz", data / "labelsTr" / "synth001.nii.gz")
    out = tmp_path / "out"
    _make_output(data, out, {"synth000": (0.30, 0), "synth001": (0.31, 0), "synth004": (0.35, 0)})
    from services.labeling.outputs import read_records

    picks = [p["case_id"] for p in suggest(read_records(out), out, 2)]
    assert picks == ["synth000", "synth004"]
    assert [r["case_id"] for r in ranking(read_records(out))][:2] == ["synth000", "synth001"]
    assert run(["label", "rank", str(out), "--suggest", "2", "--json"]) == 0

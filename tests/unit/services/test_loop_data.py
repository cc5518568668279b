"""The closed loop's student never reads an unlabeled case's ground truth (services/labeling/loop.py).

A round's training set is the dataset's labeled patients (their ground truth, through the labeled pool)
plus a labeling pass's own label files for the other cases. Here the pass's outputs are written by
hand (labels from a threshold of each image, so they differ from any ground truth; confidences per
slice), then the round's pseudo-labeled slices are built and a student trained on them:

- nnU-Net/MSD: every file opened meanwhile is recorded with an audit hook; no labelsTr file of a case
  outside the labeled patients is opened; the student trained on exactly the pass's labels, the
  labeled patients' slices and nothing else, with the confidence filter and weights applied;
- SSL4MIS HDF5: the `label` dataset is deleted from every case the job labeled; building and training
  still work (a reader touching it would fail) and the student is a `vessa predict` checkpoint.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch

from services.labeling.cases import discover, read_case
from services.labeling.loop import labeled_set, pseudo_slices, train_student
from services.labeling.outputs import CaseRecord, label_path, read_records, write_atomic, write_record
from shared.data import open_dataset, split_by_patient
from shared.data.nifti import label_to_nifti_bytes
from shared.data.resize import resize_label
from shared.data.synth import write_msd_dataset, write_ssl4mis_layout
from shared.jobs import JobSpec, LoopSpec
from student_trainer.checkpoint import load_checkpoint
from student_trainer.data import load_training_data

_recording: list[list[str]] = []
_lock = threading.Lock()


def _hook(event: str, args: tuple) -> None:
    if event == "open" and _recording:
        path = args[0]
        if isinstance(path, bytes | str | Path):
            with _lock:
                for sink in _recording:
                    sink.append(str(path if not isinstance(path, bytes) else path.decode(errors="replace")))


sys.addaudithook(_hook)  # cannot be removed; records only inside `record_opens`


@contextmanager
def record_opens():
    opened: list[str] = []
    _recording.append(opened)
    try:
        yield opened
    finally:
        _recording.remove(opened)


def _threshold_label(image: np.ndarray) -> np.ndarray:
    """A label map that is not the ground truth: intensity bands of the image."""
    lab = np.zeros(image.shape, np.uint8)
    lab[image > 0.25] = 1
    lab[image > 0.45] = 2
    lab[image > 0.65] = 3
    return lab


def _slice_conf(k: int) -> float:
    return 0.2 if k % 3 == 0 else 0.9


def _fake_pass(data: Path, out: Path) -> dict[str, np.ndarray]:
    """A labeling pass's outputs for every case of `data` (label files + records), as the runner writes
    them; returns each case's label map (D, H, W)."""
    written = {}
    for case in discover(data).cases:
        vol = read_case(case)
        label = _threshold_label(vol.image)
        dest = label_path(out, case.case_id)
        write_atomic(dest, label_to_nifti_bytes(label, vol))
        d = vol.image.shape[0]
        write_record(
            out,
            CaseRecord(
                case_id=case.case_id,
                status="ok",
                input=str(case.path),
                output=str(dest.relative_to(out)),
                slices=d,
                confidence=0.7,
                slice_confidence=[[0.99] + [_slice_conf(k)] * 3 for k in range(d)],
            ),
        )
        written[case.case_id] = label
    return written


def _job(data: Path, out: Path, labeled: int, min_confidence: float = 0.0) -> JobSpec:
    return JobSpec(
        data=str(data),
        out=str(out),
        rounds=1,
        loop=LoopSpec(labeled=labeled, steps=3, batch_size=4, image_size=32, min_confidence=min_confidence),
    )


def test_msd_student_reads_no_label_file_of_an_unlabeled_case(tmp_path):
    data = tmp_path / "msd"
    write_msd_dataset(data, cases=5, seed=3)  # synth000..002 train, 003..004 val; all have labelsTr
    prev = tmp_path / "out" / "rounds" / "0"
    written = _fake_pass(data, prev)
    job = _job(data, tmp_path / "out", labeled=1, min_confidence=0.5)
    rdir = tmp_path / "out" / "rounds" / "1"
    with record_opens() as opened:
        cases, patients = labeled_set(data, 1)
        pseudo = pseudo_slices(prev, read_records(prev), cases, patients, min_confidence=0.5)
        info = train_student(job, pseudo, rdir, 1, "k", None)
        td = load_training_data(data, 1, 32, "cpu", pseudo=pseudo)
    assert cases == {"synth000"} and patients == {"synth000"}
    labels_opened = {Path(p).name for p in opened if Path(p).parent.name == "labelsTr"}
    assert labels_opened == {"synth000.nii.gz"}, labels_opened  # the labeled patient's only
    assert any(Path(p).parent == prev / "labels" for p in opened)  # the pass's labels were the source

    # the pseudo-labeled slices: every case but the labeled one, low-confidence slices left out
    assert set(pseudo.cases) == {"synth001", "synth002", "synth003", "synth004"}
    for cid in set(pseudo.cases):
        d = written[cid].shape[0]
        kept = [k for k in range(d) if _slice_conf(k) >= 0.5]
        assert [key for key, c in zip(pseudo.keys, pseudo.cases) if c == cid] == [f"{cid}_slice_{k}" for k in kept]
        assert pseudo.dropped[cid] == d - len(kept)
        rows = [i for i, c in enumerate(pseudo.cases) if c == cid]
        for i, k in zip(rows, kept):
            assert np.array_equal(pseudo.labels[i], resize_label(written[cid][k], (256, 256)))
    assert np.allclose(pseudo.weights, 0.9)
    # what the student trained on: the labeled patient's ground truth, and these pseudo-labels
    gt = np.stack([resize_label(s.label, (32, 32)) for s in split_by_patient(open_dataset(data), 1).labeled])
    assert td.num_labeled == written["synth000"].shape[0] and td.labeled_patients == ["synth000"]
    assert np.array_equal(td.labeled_labels.numpy(), gt)  # the labeled patient: its ground truth, not the pass's
    assert td.num_unlabeled == len(pseudo)
    assert np.array_equal(td.unlabeled_labels.numpy(), np.stack([resize_label(x, (32, 32)) for x in pseudo.labels]))
    assert info["steps"] == 3 and info["final_loss"] is not None and np.isfinite(info["final_loss"])
    ckpt = load_checkpoint(rdir / "student.pt")
    assert ckpt["method"] == "pseudo_labels" and ckpt["loop_key"] == "k" and "optimizer" not in ckpt
    assert not (rdir / "train" / "best.pt").exists()  # nothing validated: no volume's ground truth read


def test_ssl4mis_job_cases_without_any_ground_truth_still_train_a_predicting_student(tmp_path):
    from student_trainer.predict import predict_file

    data = tmp_path / "h5"
    write_ssl4mis_layout(data, cases=5, seed=4, val_cases=2)  # patients 001..003 train slices; 004, 005 volumes
    for path in sorted((data / "volumes").glob("*.h5")):
        with h5py.File(path, "a") as f:
            del f["label"]  # the job's cases: no ground truth left to read
    prev = tmp_path / "out" / "rounds" / "0"
    written = _fake_pass(data, prev)
    assert set(written) == {"patient004_frame01", "patient005_frame01"}
    cases, patients = labeled_set(data, 2)
    assert patients == {"patient001", "patient002"}
    pseudo = pseudo_slices(prev, read_records(prev), cases, patients, weighted=False)
    assert len(pseudo) == sum(x.shape[0] for x in written.values()) and np.all(pseudo.weights == 1.0)
    # the HDF5 label was written with slices on the last axis: read back, it is the pass's label
    first = [i for i, c in enumerate(pseudo.cases) if c == "patient004_frame01"]
    assert np.array_equal(pseudo.labels[first[1]], resize_label(written["patient004_frame01"][1], (256, 256)))
    rdir = tmp_path / "out" / "rounds" / "1"
    torch.manual_seed(0)
    train_student(_job(data, tmp_path / "out", labeled=2), pseudo, rdir, 1, "k", None)
    # `vessa predict` takes the round's student
    import nibabel as nib

    img = np.random.default_rng(0).random((40, 48, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(img, np.diag([1.5, 1.5, 8.0, 1.0])), tmp_path / "x.nii.gz")
    res = predict_file(rdir / "student.pt", tmp_path / "x.nii.gz", tmp_path / "y.nii.gz", device="cpu")
    assert nib.load(tmp_path / "y.nii.gz").shape == (40, 48, 5) and set(res["voxels"]) == {"background", "RV", "Myo", "LV"}


def test_the_pseudo_labels_method_refuses_a_dataset_without_a_jobs_pseudo_labels(tmp_path):
    import pytest

    from student_trainer.config import TrainSettings
    from student_trainer.train import Trainer

    data = tmp_path / "msd"
    write_msd_dataset(data, cases=4, seed=5)
    cfg = TrainSettings(
        method="pseudo_labels", out_dir=tmp_path / "run", device="cpu", batch_size=4, labeled_bs=2, max_iters=2,
        progress=False, final_eval=False, data={"root": data, "n_labeled": 1, "image_size": 32, "val_split": ""},
    )
    with pytest.raises(ValueError, match="vessa label --rounds"):
        Trainer(cfg).fit()


def test_loop_settings_are_checked_where_a_job_is_described():
    import pytest
    from pydantic import ValidationError

    spec = JobSpec.model_validate({"data": "acdc", "rounds": 2, "loop": {"steps": 5, "labeled": 1}})
    assert (spec.rounds, spec.loop.steps, spec.loop.labeled, spec.loop.batch_size) == (2, 5, 1, 8)
    assert JobSpec(data="x").rounds == 0  # a plain job, as before
    for bad in ({"image_size": 40}, {"batch_size": 6}, {"steps": 0}, {"device": "tpu"}, {"min_confidence": 1.5}, {"epochs": 3}):
        with pytest.raises(ValidationError):
            JobSpec.model_validate({"data": "x", "rounds": 1, "loop": bad})
    with pytest.raises(ValidationError, match="DICOMweb"):
        JobSpec.model_validate({"rounds": 1, "dicomweb": {"url": "http://pacs:8042/dicom-web", "study": "1.2.3"}})
    with pytest.raises(ValidationError):
        JobSpec.model_validate({"data": "x", "rounds": 21})


def test_slice_weights_and_the_rounds_table():
    from services.labeling.loop import rounds_table, slice_weights

    rec = CaseRecord(case_id="c", status="ok", input="x", confidence=0.4, slice_confidence=[[0.9, 0.5, None, 0.7], [0.1, None, None, None], [0.3, 1.2, 0.8, 1.0]])
    assert np.allclose(slice_weights(rec), [0.6, 0.4, 1.0])  # mean of the asked foreground classes, clipped to 1
    rows = [
        {"round": 0, "cases": 3, "failed": 0, "confidence_mean": 0.5, "dice": 70.0, "dice_per_class": {"LV": 80.0, "RV": 60.0}, "train": None},
        {"round": 1, "cases": 3, "failed": 1, "confidence_mean": 0.6, "dice": None, "dice_per_class": None, "train": {"steps": 100, "pseudo_slices": 40}},
    ]
    lines = rounds_table(rows).splitlines()
    assert lines[0].split()[:5] == ["round", "cases", "failed", "conf", "Dice"] and "LV" in lines[0] and "RV" in lines[0]
    assert lines[2].split() == ["0", "3", "0", "0.500", "70.00", "80.00", "60.00", "-", "-"]
    assert lines[3].split() == ["1", "3", "1", "0.600", "-", "-", "-", "100", "40"]


def test_shipped_loop_configs_load_as_loop_settings_and_flags_override_them():
    from services.cli.label import _loop_spec
    from shared.jobs import LoopSpec

    root = Path(__file__).resolve().parents[3] / "configs" / "loop"
    cpu = _loop_spec(root / "cpu.yaml", None, None, None, None)
    gpu = _loop_spec(root / "gpu.yaml", None, None, None, None)
    # the CPU file is the defaults (1,000 steps: 300 made round 1 worse than round 0 on ACDC)
    assert cpu == LoopSpec().model_dump() and cpu["steps"] == 1000
    assert gpu["device"] == "cuda" and gpu["steps"] > cpu["steps"]
    flagged = _loop_spec(root / "cpu.yaml", 1, 50, 0.2, None)
    assert (flagged["labeled"], flagged["steps"], flagged["min_confidence"]) == (1, 50, 0.2)

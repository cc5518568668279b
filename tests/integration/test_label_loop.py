"""The closed loop as a labeling mode (`vessa label --rounds K`), end to end: real redis-server, a real
dispatcher process, the session's real Serve app (tiny encoder, random weights), the Stage-2 trainer
for real (a few steps of a small student), real files.

One job on the synthetic dataset (a labeled patient among its cases), run first with rounds=1, then
with rounds=2 on the same OUT (a kill between rounds: round 1 is not redone, round 2 is added), then
again (nothing redone). Every file the job opens meanwhile is recorded: the ground truth of the cases
outside the labeled patients is opened by the scoring code only, never by training."""

from __future__ import annotations

import json
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.labeling.outputs import read_manifest, read_records
from services.labeling.runner import run_label_job
from shared.jobs import JobSpec, LoopSpec
from tests.helpers import start_dispatcher, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CASES = ["synth000", "synth003", "synth006"]  # synth000 is a labeled patient (the bank's and the student's)
LABELED = 3

_recording: list[list[tuple[str, tuple[str, ...]]]] = []
_lock = threading.Lock()


def _hook(event: str, args: tuple) -> None:
    if event == "open" and _recording:
        path = args[0]
        if isinstance(path, bytes | str | Path):
            name = str(path if not isinstance(path, bytes) else path.decode(errors="replace"))
            if "labelsTr" not in name:
                return
            frames, f = [], sys._getframe(1)
            while f is not None:
                frames.append(f.f_code.co_filename)
                f = f.f_back
            with _lock:
                for sink in _recording:
                    sink.append((name, tuple(frames)))


sys.addaudithook(_hook)  # cannot be removed; records only inside `record_opens`


@contextmanager
def record_opens():
    opened: list[tuple[str, tuple[str, ...]]] = []
    _recording.append(opened)
    try:
        yield opened
    finally:
        _recording.remove(opened)


@pytest.fixture
def dispatcher(serve_app, redis_server, tmp_path):
    proc = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d.log")
    yield proc
    stop_process(proc)


def _job(data: Path, out: Path, rounds: int) -> JobSpec:
    return JobSpec(
        data=str(data),
        out=str(out),
        cases=CASES,
        rounds=rounds,
        loop=LoopSpec(labeled=LABELED, steps=4, batch_size=4, image_size=32),
    )


def _state(out: Path, r: int) -> dict:
    rdir = out / "rounds" / str(r)
    recs = read_records(rdir)
    return {
        "round": (rdir / "round.json").read_bytes(),
        "student": (rdir / "student.pt").stat().st_mtime_ns if (rdir / "student.pt").exists() else None,
        "runs": {k: (v.run_id, v.finished_at) for k, v in recs.items()},
    }


def test_two_rounds_end_to_end_resume_between_rounds_and_no_unlabeled_truth_read(
    serve_app, redis_server, dispatcher, synth_dir, tmp_path
):
    out = tmp_path / "out"
    with record_opens() as opened:
        first = run_label_job(_job(synth_dir, out, rounds=1), redis_server.url)
        assert first.failed == 0 and not first.cancelled
        before = {r: _state(out, r) for r in (0, 1)}
        assert before[1]["student"] is not None and before[0]["student"] is None
        assert json.loads(before[1]["round"])["train"]["pseudo_cases"] == 2  # synth000 is labeled: not pseudo

        # "killed between rounds": the same job asked for 2 rounds resumes at round 2
        second = run_label_job(_job(synth_dir, out, rounds=2), redis_server.url)
        assert second.failed == 0
        assert {r: _state(out, r) for r in (0, 1)} == before  # rounds 0 and 1 untouched
        manifest = read_manifest(out)
        assert manifest["job"]["rounds_redone"] == [2]

        third = run_label_job(_job(synth_dir, out, rounds=2), redis_server.url)
        assert read_manifest(out)["job"]["rounds_redone"] == [] and third.failed == 0
        assert third.labeled == 0

    # the ground truth of cases outside the labeled patients: read by the scoring code only
    unlabeled_truth = [(p, frames) for p, frames in opened if Path(p).name.split(".")[0] not in {f"synth{i:03d}" for i in range(LABELED)}]
    assert unlabeled_truth, "the rounds were scored against the dataset's ground truth"
    for path, frames in unlabeled_truth:
        assert any(f.endswith("services/labeling/scoring.py") for f in frames), (path, frames[:8])
        assert not any("/student_trainer/" in f for f in frames), (path, frames[:8])

    # the per-round table: confidence and Dice (the synthetic cases have ground truth) for rounds 0..2
    rows = manifest["job"]["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["cases"] == len(CASES) and row["failed"] == 0
        assert 0 <= row["confidence_mean"] <= 1 and row["scored_cases"] == len(CASES) and 0 <= row["dice"] <= 100
        assert set(row["dice_per_class"]) == {"RV", "Myo", "LV"}
    assert rows[0]["student"] is None and rows[2]["student"] == "rounds/2/student.pt"
    assert rows[2]["train"]["steps"] == 4 and rows[2]["train"]["pseudo_slices"] > 0
    assert (out / "rounds.json").is_file()

    # the student's softmax was the prompt: the same slices, other answers than templates-only
    r0, r1 = read_records(out / "rounds" / "0"), read_records(out / "rounds" / "1")
    assert any(r0[c].slice_confidence != r1[c].slice_confidence for c in CASES)

    # the last round is what OUT holds: labels, records (the ranking reads them)
    top = read_records(out)
    for c in CASES:
        assert top[c].run_id.endswith("-r2")
        assert (out / "labels" / f"{c}.nii.gz").read_bytes() == (out / "rounds" / "2" / "labels" / f"{c}.nii.gz").read_bytes()
    assert [c["case_id"] for c in manifest["cases"]] == sorted(CASES)

    # each round's student is a `vessa predict` checkpoint
    from student_trainer.predict import predict_file

    src = synth_dir / "imagesTr" / "synth003_0000.nii.gz"
    predict_file(out / "rounds" / "2" / "student.pt", src, tmp_path / "pred.nii.gz", device="cpu")
    pred = nib.load(tmp_path / "pred.nii.gz")
    assert pred.shape == nib.load(src).shape and np.asanyarray(pred.dataobj).max() <= 3

"""`vessa label` end to end: real redis-server, real dispatcher processes, the session's real Serve app
(tiny encoder, random weights), real files. A job over synthetic volumes, a corrupt file among them,
the runner SIGKILLed and restarted, a dispatcher killed mid-job, two jobs beside a trainer."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from services.labeling.outputs import read_manifest, read_records
from services.labeling.runner import LabelRunner, run_label_job
from shared.data import open_dataset
from shared.jobs import JobSpec
from shared.wire.canonical import canonical_slices
from shared.wire.stream_client import AsyncStreamClient
from tests.helpers import ROOT, start_dispatcher, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

N_GOOD = 6


@pytest.fixture(scope="module")
def nifti_folder(synth_dir, tmp_path_factory) -> Path:
    """A plain folder of NIfTI volumes (the synthetic cases, cut to their first 4 slices so a CPU
    replica labels them in seconds; the affine stays valid) plus one corrupt file."""
    root = tmp_path_factory.mktemp("label_in")
    for path in sorted((synth_dir / "imagesTr").glob("*.nii.gz"))[:N_GOOD]:
        img = nib.load(path)
        part = nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, :4].copy(), img.affine, img.header)
        nib.save(part, root / path.name.replace("_0000", ""))
    good = sorted(root.glob("*.nii.gz"))[0].read_bytes()
    (root / "broken.nii.gz").write_bytes(gzip.compress(gzip.decompress(good)[:600]))  # truncated voxels
    return root


@pytest.fixture
def dispatcher(serve_app, redis_server, tmp_path):
    proc = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d.log")
    yield proc
    stop_process(proc)


def _fresh_copy(src: Path, dst: Path, flip_axis: int) -> Path:
    """The good cases, flipped: slices the replica has not embedded yet, so a job takes long enough
    for a kill to land in the middle of it (cached slices would be answered almost at once)."""
    dst.mkdir()
    for case in _good_cases(src):
        img = nib.load(src / f"{case}.nii.gz")
        data = np.flip(np.asanyarray(img.dataobj), flip_axis).copy()
        nib.save(nib.Nifti1Image(data, img.affine, img.header), dst / f"{case}.nii.gz")
    return dst


def _good_cases(folder: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz") if p.name != "broken.nii.gz")


def test_job_labels_every_case_in_the_input_geometry_and_reports_the_corrupt_one(
    serve_app, redis_server, dispatcher, nifti_folder, tmp_path
):
    out = tmp_path / "out"
    summary = run_label_job(JobSpec(data=str(nifti_folder), out=str(out), batch_slices=4), redis_server.url)
    assert summary.labeled == N_GOOD and summary.failed == 1
    assert "broken" in summary.errors and "truncated" in summary.errors["broken"].lower()
    for case in _good_cases(nifti_folder):
        src = nib.load(nifti_folder / f"{case}.nii.gz")
        lab = nib.load(out / "labels" / f"{case}.nii.gz")
        assert lab.shape == src.shape
        assert np.allclose(lab.affine, src.affine)
        assert lab.get_data_dtype() == np.uint8
        assert int(lab.header["qform_code"]) == int(src.header["qform_code"])
    manifest = read_manifest(out)
    assert manifest["counts"] == {"cases": N_GOOD + 1, "ok": N_GOOD, "failed": 1}
    by_id = {c["case_id"]: c for c in manifest["cases"]}
    assert by_id["broken"]["status"] == "failed" and by_id["broken"]["error"]
    ok = by_id[_good_cases(nifti_folder)[0]]
    assert len(ok["input_sha256"]) == 64 and ok["model_version"] and ok["bank_version"] >= 0
    assert ok["slices"] == nib.load(nifti_folder / f"{ok['case_id']}.nii.gz").shape[2]
    assert set(ok["classes"]) == {"class_1", "class_2", "class_3"}  # a plain folder names no classes
    for stats in ok["classes"].values():
        if stats["voxels"]:
            assert stats["volume_ml"] > 0 and 0 <= stats["confidence_worst"] <= stats["confidence_mean"] <= 1
    header = (out / "labels.csv").read_text().splitlines()[0]
    assert header.startswith("case_id,status,confidence") and "class_1_volume_ml" in header
    assert not list(out.rglob(".*.tmp"))

    # the rerun labels nothing twice: every good case is skipped, the broken one is tried (and fails) again
    again = run_label_job(JobSpec(data=str(nifti_folder), out=str(out)), redis_server.url)
    assert (again.labeled, again.skipped, again.failed) == (0, N_GOOD, 1)
    # a changed input is labeled again (its hash differs)
    first = _good_cases(nifti_folder)[0]
    img = nib.load(nifti_folder / f"{first}.nii.gz")
    changed = tmp_path / "changed"
    shutil.copytree(nifti_folder, changed)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine, img.header), changed / f"{first}.nii.gz")
    third = run_label_job(JobSpec(data=str(changed), out=str(out)), redis_server.url)
    assert (third.labeled, third.skipped) == (1, N_GOOD - 1)

    # --probs: cases labeled without probabilities are not done for a job that asks for them
    fourth = run_label_job(JobSpec(data=str(changed), out=str(out), probs=True, batch_slices=4), redis_server.url)
    assert (fourth.labeled, fourth.skipped) == (N_GOOD, 0)
    for case in _good_cases(changed):
        src = nib.load(changed / f"{case}.nii.gz")
        probs = nib.load(out / "probs" / f"{case}.nii.gz")
        assert probs.shape == (*src.shape, 4)  # background + 3 classes on the 4th axis
        assert np.allclose(probs.affine, src.affine) and probs.get_data_dtype() == np.uint8
        assert np.asanyarray(probs.dataobj).max() > 0
        assert read_records(out)[case].probs_output == f"probs/{case}.nii.gz"
    assert run_label_job(JobSpec(data=str(changed), out=str(out), probs=True), redis_server.url).skipped == N_GOOD


def _label_cli(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "label", *args],
        cwd=ROOT,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )


def test_runner_sigkilled_mid_job_resumes_without_relabeling(serve_app, redis_server, dispatcher, nifti_folder, tmp_path):
    """`vessa label` killed with SIGKILL after two cases; the rerun finishes the rest, leaves the
    finished ones as they were (same run, same time) and no temporary or partial file anywhere."""
    data = _fresh_copy(nifti_folder, tmp_path / "data", flip_axis=0)
    out = tmp_path / "out"
    args = ["--data", str(data), "--out", str(out), "--redis", redis_server.url, "--cases-in-flight", "1", "--batch-slices", "2", "--no-progress"]
    proc = _label_cli(args, tmp_path / "run1.log")
    deadline = time.monotonic() + 600
    while len(read_records(out)) < 2:
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    before = {k: r for k, r in read_records(out).items() if r.status == "ok"}
    assert 2 <= len(before) < N_GOOD, "the kill did not land mid-job"
    second = _label_cli(args, tmp_path / "run2.log")
    assert second.wait(600) == 0, (tmp_path / "run2.log").read_text()
    after = read_records(out)
    assert sorted(after) == _good_cases(data) and all(r.status == "ok" for r in after.values())
    for case, rec in before.items():
        assert (after[case].run_id, after[case].finished_at) == (rec.run_id, rec.finished_at), f"{case} relabeled"
    assert len({r.run_id for r in after.values()}) == 2
    assert not list(out.rglob(".*.tmp")) and not list(out.rglob("*.tmp"))
    for case in after:
        nib.load(out / "labels" / f"{case}.nii.gz").get_fdata()  # every file whole
    log = (tmp_path / "run2.log").read_text()
    assert f"{N_GOOD - len(before)} labeled, {len(before)} already done, 0 failed" in log


def test_dispatcher_restart_mid_job_loses_nothing(serve_app, redis_server, nifti_folder, tmp_path):
    env = {"claim_idle_ms": 1500, "claim_interval_s": 0.5}
    first = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d1.log", consumer="first", **env)
    out = tmp_path / "out"
    box: dict = {}
    data = _fresh_copy(nifti_folder, tmp_path / "data", flip_axis=1)
    job = JobSpec(data=str(data), out=str(out), batch_slices=2, max_in_flight=6)
    t = threading.Thread(target=lambda: box.setdefault("s", run_label_job(job, redis_server.url)))
    t.start()
    second = None
    try:
        deadline = time.monotonic() + 600
        while len(read_records(out)) < 1:
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.05)
        first.kill()  # mid-job: requests read and unanswered, others not read yet
        first.wait(10)
        second = start_dispatcher(redis_server.url, serve_app.gcs_address, tmp_path / "d2.log", consumer="second", **env)
        t.join(600)
    finally:
        stop_process(first)
        if second is not None:
            stop_process(second)
    assert not t.is_alive()
    s = box["s"]
    assert (s.labeled, s.failed) == (N_GOOD, 0)
    assert s.cases == N_GOOD and all(r.status == "ok" for r in read_records(out).values())


def test_two_jobs_and_a_trainer_share_the_service(serve_app, redis_server, dispatcher, nifti_folder, synth_dir, tmp_path):
    """Two jobs at once and a trainer's requests beside them: everything completes; the jobs keep at
    most `max_in_flight` requests each on the stream, so the trainer's are served in between."""
    ds = open_dataset(synth_dir)
    trainer_slices = canonical_slices([ds.read_unlabeled(r).image for r in ds.slice_refs()[:4]])
    cases = _good_cases(nifti_folder)
    peak = {"a": 0, "b": 0}

    async def scenario():
        runners = {
            name: LabelRunner(JobSpec(data=str(nifti_folder), out=str(tmp_path / name), cases=part, batch_slices=2, max_in_flight=2), redis_server.url)
            for name, part in (("a", cases[:3]), ("b", cases[3:]))
        }
        jobs = [asyncio.create_task(r.run()) for r in runners.values()]
        trainer = AsyncStreamClient(redis_server.url, "trainer-beside-jobs", max_in_flight=4)
        await trainer.start()
        answers = []
        try:
            for i in range(12):
                rid = await trainer.submit(trainer_slices[i % 4][None])
                answers.append(await trainer.result(rid, 120))
                # the jobs' own bound: never more than max_in_flight requests out
                for name, r in runners.items():
                    c = getattr(r, "client", None)
                    if c is not None:
                        peak[name] = max(peak[name], c.in_flight)
        finally:
            await trainer.close()
        return await asyncio.gather(*jobs), answers

    summaries, answers = asyncio.run(scenario())
    assert all(a is not None and a.status == "ok" for a in answers)
    assert [s.labeled for s in summaries] == [3, N_GOOD - 3] and all(s.failed == 0 for s in summaries)
    assert max(peak.values()) <= 2
    for name in ("a", "b"):
        assert json.loads((tmp_path / name / "labels.json").read_text())["counts"]["failed"] == 0


def test_demo_labeling_step_runs_the_loop_tables_each_round_ranks_and_pictures(serve_app, redis_server, dispatcher, synth_dir, tmp_path):
    """The demo's labeling step (services/demo/pipeline.py) with the closed loop, as `vessa demo` runs it:
    the unlabeled patients' cases (here the 2 training cases after the first 4 patients) labeled as one
    job, round 0 and one student round, the per-round table scored against those cases' truth, and the
    report's sections: the ranking with the least and most trusted labels, a case over the rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.demo.pipeline import _label_unlabeled
    from services.demo.report import _labeling_section, _rounds_section
    from shared.jobs import LoopSpec

    loop = LoopSpec(labeled=4, steps=4, batch_size=4, image_size=64, seed=0)
    labeling = _label_unlabeled(redis_server.url, synth_dir, 4, tmp_path / "labels", rounds=1, loop=loop)
    assert sorted(labeling["records"]) == ["synth004", "synth005"]
    assert labeling["summary"].labeled == 2  # the last pass's
    assert [row["round"] for row in labeling["rounds"]] == [0, 1]
    assert all(row["failed"] == 0 and row["cases"] == 2 for row in labeling["rounds"])
    assert all(0.0 <= row["dice"] <= 100.0 for row in labeling["rounds"])  # scored: the synthetic set has truth
    student = labeling["out"] / labeling["rounds"][1]["student"]
    assert student.is_file() and labeling["rounds"][1]["train"]["steps"] == 4
    md = _labeling_section(tmp_path, labeling, plt)
    assert "| 1 | " in md and "| 2 | " in md and "labels_ranking.png" in md
    assert (tmp_path / "labels_ranking.png").stat().st_size > 1000
    md = _rounds_section(tmp_path, labeling, {1: {"summary": {"mean": {"dice": 0.5}}}}, plt)
    assert "| 0 | " in md and "| 1 | " in md and "50.00" in md and "rounds.png" in md
    assert (tmp_path / "rounds.png").stat().st_size > 1000

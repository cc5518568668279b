"""The job API end to end: real HTTP to a real Serve ingress (its own app on the session's Ray, with a
data root and the Redis path), a real runner actor placed by Ray, a real dispatcher and redis-server."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from services.ingress.client import AssistantAPIError, AssistantClient
from services.labeling.outputs import read_records
from tests.helpers import SERVE_TEST_ARGS, SMALL, copy_bank, free_port, start_dispatcher, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

N_CASES = 6


def _write_cases(synth_dir: Path, dst: Path, flip_axis: int | None = None, slices: int = 4) -> Path:
    """The synthetic cases as a folder of NIfTI files, cut to `slices` slices (optionally flipped: new
    slices the replica has not embedded, so a job takes long enough to be cancelled or killed)."""
    dst.mkdir(parents=True)
    for path in sorted((synth_dir / "imagesTr").glob("*.nii.gz"))[:N_CASES]:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)[:, :, :slices]
        if flip_axis is not None:
            data = np.flip(data, flip_axis)
        nib.save(nib.Nifti1Image(data.copy(), img.affine, img.header), dst / path.name.replace("_0000", ""))
    return dst


@pytest.fixture(scope="module")
def jobs_service(serve_app, tiny_bank, tmp_path_factory, synth_dir):
    """An ingress with jobs on (data root, output root, Redis) at /jobsapp, a Redis and a dispatcher."""
    from ray import serve

    from services.ingress.app import build_app
    from services.runtime.redis_server import EmbeddedRedis

    base = tmp_path_factory.mktemp("jobs")
    root, out_root = base / "data", base / "labels"
    root.mkdir()
    redis_server = EmbeddedRedis(base / "redis").start()
    bank = copy_bank(tiny_bank, base / "bank")
    pacs_port = free_port()  # the PACS this service may read: the `orthanc` fixture starts it there
    args = {
        **SERVE_TEST_ARGS,
        "bank": str(bank),
        "redis_url": redis_server.url,
        "data_root": str(root),
        "job_output_root": str(out_root),
        "dicomweb_allowed": f"http://127.0.0.1:{pacs_port}/dicom-web",
    }
    serve.run(build_app(args, {"VessaAssistant": dict(SMALL), "VessaIngress": dict(SMALL)}), name="vessa_jobs", route_prefix="/jobsapp")
    url = serve_app.url + "/jobsapp"
    wait_ready(url, 600)  # a replica start on a loaded 2-core machine can take minutes
    disp = start_dispatcher(redis_server.url, serve_app.gcs_address, base / "d.log")
    yield {"url": url, "root": root, "out": out_root, "redis": redis_server.url, "pacs_port": pacs_port}
    disp.terminate()
    disp.wait(30)
    serve.delete("vessa_jobs")
    redis_server.stop()


@pytest.fixture(scope="module")
def orthanc(jobs_service, tmp_path_factory):
    """A real Orthanc (tests/orthanc.py) on the port the jobs service may read DICOMweb from."""
    from tests.orthanc import OrthancServer

    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), http_port=jobs_service["pacs_port"]).start()
    yield server
    server.stop()


def _wait_final(client: AssistantClient, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end: {job}")


def test_job_over_rest_labels_reports_and_ranks(jobs_service, synth_dir):
    root = jobs_service["root"]
    ds = _write_cases(synth_dir, root / "study")
    good = ds / sorted(os.listdir(ds))[0]
    (ds / "corrupt.nii.gz").write_bytes(good.read_bytes()[:300])
    client = AssistantClient(jobs_service["url"])
    created = client.label_dataset("study", selection="all", batch_slices=4)
    assert created["state"] == "queued" and created["out"].startswith(str(jobs_service["out"]))
    job = _wait_final(client, created["job_id"])
    assert job["state"] == "done", job
    assert job["counts"] == {"cases": N_CASES + 1, "labeled": N_CASES, "skipped": 0, "failed": 1}
    assert "corrupt" in job["errors"] and job["slices_per_s"] > 0 and job["finished"] >= job["started"]
    out = Path(created["out"])
    for src in sorted(ds.glob("synth*.nii.gz")):
        lab = nib.load(out / "labels" / src.name)
        assert np.allclose(lab.affine, nib.load(src).affine) and lab.get_data_dtype() == np.uint8
    ranking = client.job_ranking(created["job_id"])["ranking"]
    assert len(ranking) == N_CASES
    confs = [r["confidence"] for r in ranking]
    assert confs == sorted(confs) and [r["rank"] for r in ranking] == list(range(1, N_CASES + 1))
    assert created["job_id"] in [j["job_id"] for j in client.jobs()]


def test_dataset_paths_outside_the_data_root_are_refused(jobs_service, tmp_path):
    root = jobs_service["root"]
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    client = AssistantClient(jobs_service["url"])
    for path in ("../", "..", "study/../../", str(outside), "/etc", "escape", "escape/."):
        with pytest.raises(AssistantAPIError) as err:
            client.label_dataset(path)
        assert err.value.status == 400, (path, err.value)
        assert "data root" in err.value.detail
    with pytest.raises(AssistantAPIError) as err:
        client.label_dataset("no-such-study")
    assert err.value.status == 404
    r = httpx.post(jobs_service["url"] + "/v1/jobs", json={"data": "study", "unknown": 1}, timeout=10)
    assert r.status_code == 422
    for bad in ("zzzz", "0123456789ab", "../../etc"):
        assert httpx.get(jobs_service["url"] + f"/v1/jobs/{bad}", timeout=10).status_code == 404


def test_cancel_stops_the_job_and_keeps_finished_outputs(jobs_service, synth_dir):
    _write_cases(synth_dir, jobs_service["root"] / "to-cancel", flip_axis=0)
    client = AssistantClient(jobs_service["url"])
    job_id = client.label_dataset("to-cancel", cases_in_flight=1, batch_slices=1, max_in_flight=1)["job_id"]
    deadline = time.monotonic() + 600
    while client.job(job_id)["counts"]["labeled"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.cancel_job(job_id)
    job = _wait_final(client, job_id)
    assert job["state"] == "cancelled"
    out = Path(jobs_service["out"]) / job_id
    recs = read_records(out)
    assert 1 <= job["counts"]["labeled"] == len(recs) < N_CASES
    for case in recs:
        nib.load(out / "labels" / f"{case}.nii.gz").get_fdata()
    assert not list(out.rglob("*.tmp"))
    assert client.job_ranking(job_id)["state"] == "cancelled"


def test_runner_actor_killed_is_restarted_and_finishes_without_relabeling(jobs_service, synth_dir):
    """SIGKILL the runner actor's process mid-job: Ray restarts the actor, which resumes from the
    records on disk; the cases finished before the kill keep their first record."""
    import ray

    from services.labeling.job_actor import NAMESPACE, actor_name

    _write_cases(synth_dir, jobs_service["root"] / "to-kill", flip_axis=1)
    client = AssistantClient(jobs_service["url"])
    job_id = client.label_dataset("to-kill", cases_in_flight=1, batch_slices=1, max_in_flight=1)["job_id"]
    out = Path(jobs_service["out"]) / job_id
    deadline = time.monotonic() + 600
    while len(read_records(out)) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    actor = ray.get_actor(actor_name(job_id), namespace=NAMESPACE)
    os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
    before = read_records(out)
    job = _wait_final(client, job_id)
    assert job["state"] == "done" and job["runs"] == 2, job
    after = read_records(out)
    assert len(after) == N_CASES and all(r.status == "ok" for r in after.values())
    for case, rec in before.items():
        assert after[case].run_id == rec.run_id and after[case].finished_at == rec.finished_at
    assert not list(out.rglob("*.tmp"))
    shutil.rmtree(out)


def test_vessa_label_url_runs_the_job_on_the_service(jobs_service, synth_dir, capsys):
    """`vessa label --url`: the service's runner does the work, the command follows it; the corrupt
    case makes the exit code 1 and is named."""
    from services.cli.main import run

    if not (jobs_service["root"] / "study").is_dir():  # when run alone
        test_job_over_rest_labels_reports_and_ranks(jobs_service, synth_dir)
    code = run(["label", "--url", jobs_service["url"], "--data", "study", "--all", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"done: {N_CASES + 1} cases, {N_CASES} labeled, 0 already done, 1 failed" in out
    assert "failed  corrupt:" in out


def test_dicomweb_job_over_rest(jobs_service, orthanc, tmp_path):
    """POST /v1/jobs with a `dicomweb` source, end to end against a real Orthanc: the runner actor finds
    the study's series (QIDO-RS), fetches it (WADO-RS), labels it and stores the SEG back (STOW-RS)
    with credentials from its environment; the SEG read back from the PACS says what the NIfTI says,
    and the password is in nothing the job wrote. A PACS not allowed, or a bad option, is a 4xx."""
    import pydicom
    from pydicom.uid import generate_uid

    from services.labeling import dicomweb
    from services.labeling.cases import discover, read_case
    from services.labeling.outputs import read_manifest
    from shared.data.dicom_seg import read_seg_labelmap
    from shared.data.dicom_write import write_dicom_series
    from shared.data.synth import synth_case

    assert os.environ[dicomweb.ENV_PASSWORD] == orthanc.password  # what Ray's workers were started with
    study = generate_uid()
    case = synth_case(0, 2)
    files = write_dicom_series(case.image[:3], case.spacing, tmp_path / "study", study_uid=study)
    series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert dicomweb.store(orthanc.dicomweb, files) == len(files)
    url = jobs_service["url"] + "/v1/jobs"
    body = {"dicomweb": {"url": orthanc.dicomweb, "study": study, "store_seg": True}, "class_names": {"1": "RV", "2": "Myo", "3": "LV"}}
    r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == 202, r.text
    created = r.json()
    client = AssistantClient(jobs_service["url"])
    job = _wait_final(client, created["job_id"])
    assert job["state"] == "done" and job["counts"]["labeled"] == 1 and job["counts"]["failed"] == 0, job
    out = Path(created["out"])
    (rec,) = read_manifest(out)["cases"]
    assert rec["case_id"] == series and rec["seg_output"] == f"seg/{series}.dcm"
    segs = [uid for uid, modality in dicomweb.find_series(dicomweb.connect(orthanc.dicomweb), study) if modality == "SEG"]
    assert len(segs) == 1  # stored back on the PACS
    (seg_ds,) = dicomweb.retrieve_series(orthanc.dicomweb, study, segs[0])
    assert str(seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID) == series
    seg_ds.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    vol = read_case(discover(out / "dicomweb" / study).cases[0])
    label = np.transpose(np.asarray(nib.load(out / rec["output"]).dataobj), (2, 1, 0))
    back, names = read_seg_labelmap(tmp_path / "seg.dcm", vol)
    assert np.array_equal(back, label) and set(names.values()) == {"RV", "Myo", "LV"}
    secret = orthanc.password
    assert secret not in httpx.get(f"{url}/{created['job_id']}", timeout=10).text
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".csv") and secret in p.read_text()]
    other = {**body, "dicomweb": {**body["dicomweb"], "url": "http://127.0.0.1:1/dicom-web"}}
    r = httpx.post(url, json=other, timeout=30)
    assert r.status_code == 400 and "VESSA_DICOMWEB_ALLOWED" in r.text
    for bad in (0.5, -1):
        r = httpx.post(url, json={"data": "study", "temporal_context": bad}, timeout=30)
        assert r.status_code == 422 and "temporal_context" in r.text

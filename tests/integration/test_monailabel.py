"""MONAI Label's dialect against a live Serve app (real replicas, real HTTP), driven by the `monailabel`
package's own client (`monailabel.client.MONAILabelClient`, 0.8.5, unchanged) and by a replay of the
exact calls 3D Slicer's MONAI Label module makes in its loop.

The service: an ingress with VESSA_API_TOKEN set, two assistant replicas, a data root holding an
MSD dataset of four cases (`study`) and the outputs of a labeling job over three of them (written here
as `vessa label` writes them, with known confidences, so the ranking is known)."""

from __future__ import annotations

import cgi
import json
import shutil
import threading
import time
from email.message import Message
from io import BytesIO
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from services.labeling import review as reviews
from services.labeling.outputs import CaseRecord, ClassStats, label_path, write_manifest, write_record
from shared.data.nrrd import read_nrrd, write_nrrd
from tests.helpers import SERVE_TEST_ARGS, SMALL, copy_bank, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOKEN = "monailabel-test-token-0123456789"
CLASSES = {1: "RV", 2: "Myo", 3: "LV"}
CONFIDENCE = {"synth000": 0.9, "synth001": 0.3, "synth002": 0.6}  # synth003: no job labeled it
SLICES = 4
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def ml(serve_app, tiny_bank, synth_dir, tmp_path_factory):
    from ray import serve

    from services.ingress.app import build_app

    base = tmp_path_factory.mktemp("ml")
    root = base / "data"
    study = root / "study"
    (study / "imagesTr").mkdir(parents=True)
    (study / "labelsTr").mkdir()
    shutil.copy(synth_dir / "dataset.json", study / "dataset.json")
    truth = {}
    for case in ("synth000", "synth001", "synth002", "synth003"):
        img = nib.load(synth_dir / "imagesTr" / f"{case}_0000.nii.gz")
        lab = nib.load(synth_dir / "labelsTr" / f"{case}.nii.gz")
        arr = np.asanyarray(img.dataobj)[:, :, :SLICES].copy()
        nib.save(nib.Nifti1Image(arr, img.affine, img.header), study / "imagesTr" / f"{case}_0000.nii.gz")
        truth[case] = np.asanyarray(lab.dataobj)[:, :, :SLICES].astype(np.uint8)
        nib.save(nib.Nifti1Image(truth[case], img.affine, img.header), study / "labelsTr" / f"{case}.nii.gz")
    out = root / "vessa-labels" / "0123456789ab"
    for case, conf in CONFIDENCE.items():
        dest = label_path(out, case)
        dest.parent.mkdir(parents=True, exist_ok=True)
        affine = nib.load(study / "imagesTr" / f"{case}_0000.nii.gz").affine
        nib.save(nib.Nifti1Image(truth[case], affine), dest)
        write_record(
            out,
            CaseRecord(
                case_id=case,
                status="ok",
                input=str(study / "imagesTr" / f"{case}_0000.nii.gz"),
                output=str(dest.relative_to(out)),
                slices=SLICES,
                classes={n: ClassStats(index=i, confidence_mean=conf, voxels=int((truth[case] == i).sum())) for i, n in CLASSES.items()},
                confidence=conf,
                model_version="m",
                bank_version=1,
                finished_at=time.time(),
            ),
        )
    write_manifest(out, {"job_id": out.name}, {})
    bank = copy_bank(tiny_bank, base / "bank")
    args = {**SERVE_TEST_ARGS, "bank": str(bank), "data_root": str(root), "monailabel_datastore": "study", "api_token": TOKEN}
    deployments = {"VessaAssistant": {**SMALL, "num_replicas": 2}, "VessaIngress": dict(SMALL)}
    serve.run(build_app(args, deployments), name="vessa_ml", route_prefix="/ml")
    url = serve_app.url + "/ml"
    wait_ready(url, 600)
    tmp = base / "client"
    tmp.mkdir()
    yield {"url": url, "study": study, "out": out, "truth": truth, "tmp": tmp}
    serve.delete("vessa_ml")


def client(ml):
    """A new client per call, logged in, as Slicer's module makes one (`MONAILabelLogic._client`): the
    client keeps the headers of its last request, so one client cannot serve a POST and then a GET."""
    from monailabel.client import MONAILabelClient

    c = MONAILabelClient(ml["url"], tmpdir=str(ml["tmp"]), client_id="tester")
    c.update_auth(c.auth_token("anyone", TOKEN))
    return c


def _image(ml, case: str) -> nib.Nifti1Image:
    return nib.load(ml["study"] / "imagesTr" / f"{case}_0000.nii.gz")


def test_monailabel_client_loop(ml):
    from monailabel.client import MONAILabelClient

    assert MONAILabelClient(ml["url"]).auth_enabled()
    info = client(ml).info()
    assert info["labels"] == ["RV", "Myo", "LV"]
    assert "config" not in info
    model = info["models"]["vessa"]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {"RV": 1, "Myo": 2, "LV": 3}
    assert set(info["strategies"]) == {"vessa", "random", "first"} and info["trainers"]
    assert info["datastore"] == {"total": 4, "completed": 0, "label_tags": {"original": 3}}

    # next sample: the least trusted pseudo-label first
    sample = client(ml).next_sample("vessa", {})
    assert sample["id"] == "synth001" and sample["name"] == "synth001.nii.gz"
    assert Path(sample["path"]) == (ml["study"] / "imagesTr" / "synth001_0000.nii.gz").resolve()

    # infer: a label map in the input's geometry, the label names of the served classes
    image = _image(ml, "synth001")
    result, params = client(ml).infer("vessa", "synth001", {})
    lab = nib.load(result)
    assert lab.shape == image.shape and np.allclose(lab.affine, image.affine)
    assert lab.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(lab.dataobj))) <= {0, 1, 2, 3}
    assert params["label_names"] == {"RV": 1, "Myo": 2, "LV": 3}
    assert set(params["confidence"]) == {"RV", "Myo", "LV"} and params["latencies"]["total"] > 0
    bank_before = params["bank_version"]
    # the same answer as NRRD (what Slicer asks for): same voxels, same geometry
    result_nrrd, params_nrrd = client(ml).infer("vessa", "synth001", {"result_extension": ".nrrd"})
    assert result_nrrd.endswith(".nrrd")
    arr, affine = read_nrrd(Path(result_nrrd).read_bytes(), 1 << 30)
    assert np.array_equal(arr, np.asanyarray(lab.dataobj)) and np.allclose(affine, image.affine)

    # save the corrected label (the ground truth) as final; the datastore shows the tag
    fixed = ml["tmp"] / "synth001_fixed.nii.gz"
    nib.save(nib.Nifti1Image(ml["truth"]["synth001"], image.affine), fixed)
    saved = client(ml).save_label("synth001", str(fixed))
    assert saved["image"] == "synth001" and saved["tag"] == "final" and saved["version"] == 1
    store = client(ml).datastore()
    assert set(store["objects"]["synth001"]["labels"]) == {"original", "final"}
    assert store["objects"]["synth001"]["labels"]["original"]["info"]["params"]["label_names"] == {"RV": 1, "Myo": 2, "LV": 3}
    # ... as a corrected version beside the pseudo-label, in the job's review (the review page reads it)
    rev = reviews.read_review(ml["out"], "synth001")
    assert rev.state == "corrected" and len(rev.versions) == 1
    stored = nib.load(ml["out"] / rev.versions[0].path)
    assert np.array_equal(np.asanyarray(stored.dataobj), ml["truth"]["synth001"])
    assert client(ml).info()["datastore"]["completed"] == 1
    # downloading it gives it back
    got = client(ml).download_label("synth001", "final")
    assert np.array_equal(np.asanyarray(nib.load(got).dataobj), ml["truth"]["synth001"])

    # next sample skips the finalised case
    nxt = client(ml).next_sample("vessa", {})
    assert nxt["id"] in {"synth000", "synth002"}
    assert client(ml).next_sample("first", {})["id"] == "synth000"

    # with the bank flag the correction becomes templates: a new bank version serves the next infer
    fixed2 = ml["tmp"] / "synth002_fixed.nii.gz"
    nib.save(nib.Nifti1Image(ml["truth"]["synth002"], _image(ml, "synth002").affine), fixed2)
    saved2 = client(ml).save_label("synth002", str(fixed2), params={"add_to_bank": True})
    assert saved2["bank"]["version"] == bank_before + 1 and saved2["bank"]["added"] > 0
    _, params2 = client(ml).infer("vessa", "synth000", {})
    assert params2["bank_version"] == bank_before + 1
    assert reviews.read_review(ml["out"], "synth002").bank_version == bank_before + 1

    # "train" adds the corrections not yet in the bank (synth001's): one more version; then a short
    # Stage-1 fine-tune in a Ray actor writes a new checkpoint, which every replica then serves
    store = ml["out"].parent / "monailabel" / "study"
    model_before = params2["model_version"]
    t0 = time.monotonic()
    run = client(ml).train_start("vessa", {"max_steps": 3, "batch_size": 2})
    assert run["status"] == "RUNNING" and run["params"]["max_steps"] == 3
    deadline = time.monotonic() + 300
    while client(ml).train_status(check_if_running=True):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    status = client(ml).train_status()
    assert status["status"] == "DONE", status
    assert set(status["result"]["added_cases"]) == {"synth001"}
    assert status["result"]["bank_version"] == bank_before + 2
    assert status["step"] == 3 and status["loss"] is not None and status["end_ts"] >= status["start_ts"]
    ckpts = sorted(p.name for p in (store / "checkpoints").glob("*.pt"))
    assert ckpts == [f"vessa-{run['id']}.pt"] and status["result"]["checkpoint"] == ckpts[0]
    assert (store / "checkpoints" / f"vessa-{run['id']}.config.resolved.yaml").is_file()
    new_model = status["result"]["model"]
    assert new_model != model_before and new_model.startswith(ckpts[0])
    print(f"train -> serving the new model: {time.monotonic() - t0:.1f} s")
    # both replicas answer with the new model
    for _ in range(6):
        _, p = client(ml).infer("vessa", "synth000", {})
        assert p["model_version"] == new_model
    info = client(ml).info()
    assert new_model in info["models"]["vessa"]["description"] and info["train_stats"]["vessa"]["model"] == new_model


def test_train_busy_and_stop(ml):
    """A second POST while a run goes on is refused (429); DELETE kills the actor: STOPPED, no new
    checkpoint file, the model served before is still served."""
    from monailabel.client.client import MONAILabelClientException

    store = ml["out"].parent / "monailabel" / "study"
    before = sorted((store / "checkpoints").glob("*.pt")) if (store / "checkpoints").exists() else []
    _, p = client(ml).infer("vessa", "synth000", {})
    served = p["model_version"]
    run = client(ml).train_start("vessa", {"max_steps": 20000})
    assert run["status"] == "RUNNING"
    with pytest.raises(MONAILabelClientException) as busy:
        client(ml).train_start("vessa", {"max_steps": 1})
    assert "Status: 429" in str(busy.value)  # the client keeps the status in its message
    # generous: on a loaded 2-core CI machine the actor's start, bank update and first step took > 2 min
    deadline = time.monotonic() + 600
    while (status := client(ml).train_status())["step"] < 1:  # fine-tuning, not only adding to the bank
        assert status["status"] == "RUNNING" and time.monotonic() < deadline, str(status)
        time.sleep(0.5)
    stopped = client(ml).train_stop()
    assert stopped["status"] == "STOPPED" and stopped["id"] == run["id"]
    assert client(ml).train_status()["status"] == "STOPPED"
    assert client(ml).train_status(check_if_running=True) is False
    assert sorted((store / "checkpoints").glob("*.pt")) == before
    assert not (store / "train" / run["id"]).exists()
    _, p = client(ml).infer("vessa", "synth000", {})
    assert p["model_version"] == served
    with httpx.Client(timeout=30) as h:  # bad params are refused before anything starts
        r = h.post(ml["url"] + "/train/vessa", json={"max_steps": "many"}, headers=AUTH)
        assert r.status_code == 400 and "max_steps" in r.json()["detail"]


def _multipart(response: httpx.Response) -> tuple[dict, dict[str, bytes]]:
    """Split a multipart answer the way the clients do (cgi.FieldStorage): form fields and files."""
    msg = Message()
    for k, v in response.headers.items():
        msg[k] = v
    fs = cgi.FieldStorage(fp=BytesIO(response.content), environ={"REQUEST_METHOD": "POST"}, headers=msg, keep_blank_values=True)
    form, files = {}, {}
    for f in fs.list:
        if f.filename:
            files[f.filename] = f.value
        else:
            form[f.name] = f.value
    return form, files


def test_slicer_module_loop_replayed(ml):
    """The calls of Slicer's MONAI Label module (plugins/slicer/MONAILabel/MONAILabel.py) in its loop:
    connect (auth, info), next sample, auto-segment, submit; `/auth/` and the training poll on every
    refresh. Each answer is checked for the keys and codes the module reads."""
    from monailabel.client.client import MONAILabelUtils

    url = ml["url"]
    with httpx.Client(timeout=120) as h:

        def refresh() -> dict:
            auth = h.get(url + "/auth/")  # MONAILabelLogic._client: mc.auth_enabled(), no token yet
            assert auth.status_code == 200 and auth.json()["enabled"] is True
            tok = h.post(url + "/auth/token", data={"username": "user-xyz", "password": TOKEN, "grant_type": "password"})
            assert tok.status_code == 200
            token = tok.json()
            headers = {"Authorization": f"{token['token_type']} {token['access_token']}"}
            assert h.get(url + "/auth/token/valid", headers=headers).status_code == 200
            info = h.get(url + "/info/", headers=headers)
            assert info.status_code == 200
            body = info.json()
            assert not body.get("config")  # fetchInfo: a "config" key means an outdated server
            for v in body["models"].values():
                assert v["type"] in ("segmentation", "detection", "deepgrow", "deepedit", "scribbles")
                assert "description" in v and isinstance(v["config"], dict)
            assert isinstance(body["labels"], list) and body["strategies"] and body["trainers"]
            assert {"completed", "total"} <= set(body["datastore"])
            # isTrainingRunning(check_only=True): anything but 200 means "not running"
            assert h.get(url + "/train/?check_if_running=true", headers=headers).status_code == 404
            return headers

        headers = refresh()
        # the login refuses a wrong token; without one every data route is 401
        assert h.post(url + "/auth/token", data={"username": "u", "password": "wrong"}).status_code == 401
        assert h.get(url + "/info/").status_code == 401

        # next sample (onNextSampleButton): id, path, name; then the original label and its names
        nxt = h.post(url + "/activelearning/vessa", json={"client_id": "tester"}, headers=headers)
        assert nxt.status_code == 200
        sample = nxt.json()
        image_id = sample["id"]
        assert sample["name"] == image_id + ".nii.gz" and sample["path"]
        assert image_id == "synth000"  # the one pseudo-labeled case left without a final label
        img = h.get(url + "/datastore/image", params={"image": image_id}, headers=headers)
        assert img.status_code == 200 and img.content == Path(sample["path"]).read_bytes()
        store = h.get(url + "/datastore/?output=all", headers=headers).json()
        names = store["objects"][image_id]["labels"]["original"]["info"]["params"]["label_names"]
        assert list(names) == ["RV", "Myo", "LV"]
        orig = h.get(url + "/datastore/label", params={"label": image_id, "tag": "original"}, headers=headers)
        assert orig.status_code == 200 and "filename=" in orig.headers["content-disposition"]

        # auto-segment (onClickSegmentation → logic.infer): params with result_extension .nrrd, uint8
        params = {"result_extension": ".nrrd", "result_dtype": "uint8", "client_id": "user-xyz"}
        ctype, body = MONAILabelUtils.encode_multipart_formdata({"params": json.dumps(params)}, {})
        res = h.post(url + f"/infer/vessa?image={image_id}", content=bytes(body), headers={**headers, "content-type": ctype})
        assert res.status_code == 200 and res.headers["content-type"].startswith("multipart/form-data")
        form, files = _multipart(res)
        answer = json.loads(form["params"])
        labels = [k for k, _ in sorted(answer["label_names"].items(), key=lambda kv: kv[1])]
        assert labels == ["RV", "Myo", "LV"]
        (name, data), = files.items()
        assert name.endswith(".nrrd")
        arr, affine = read_nrrd(data, 1 << 30)
        image = nib.load(sample["path"])
        assert arr.shape == image.shape and arr.dtype == np.uint8 and np.allclose(affine, image.affine)

        # submit (onSaveLabel): Slicer exports its segments in its own order, values 1..n, and says which
        # segment each value is in label_info; here LV, RV, Myo: the stored label has VESSA's indices
        truth = ml["truth"][image_id] if image_id in ml["truth"] else None
        assert truth is not None
        order = ["LV", "RV", "Myo"]
        exported = np.zeros_like(truth)
        for k, name_ in enumerate(order, start=1):
            exported[truth == {"RV": 1, "Myo": 2, "LV": 3}[name_]] = k
        label_info = [{"name": n, "idx": i + 1} for i, n in enumerate(order)]
        save = h.put(
            url + "/datastore/label",
            params={"image": image_id},
            data={"params": json.dumps({"label_info": label_info, "model": "vessa", "client_id": "user-xyz"})},
            files={"label": ("label.nrrd", write_nrrd(exported, image.affine), "application/octet-stream")},
            headers=headers,
        )
        assert save.status_code == 200, save.text
        final = h.get(url + "/datastore/label", params={"label": image_id, "tag": "final"}, headers=headers)
        stored = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(final.content))
        assert np.array_equal(np.asanyarray(stored.dataobj), truth)
        headers = refresh()  # fetchInfo after the save
        done = h.get(url + "/info/", headers=headers).json()["datastore"]
        assert done["label_tags"].get("final", 0) >= 1


def test_monailabel_refuses_bad_input_with_4xx_and_saves_nothing(ml):
    url = ml["url"]
    label = ml["tmp"] / "bad_label.nii.gz"
    with httpx.Client(timeout=120, headers=AUTH) as h:
        before = h.get(url + "/datastore/?output=all").json()
        assert h.post(url + "/infer/nope?image=synth000").status_code == 404  # unknown model
        assert h.post(url + "/infer/vessa").status_code == 400  # neither image nor file
        assert h.post(url + "/infer/vessa?image=nosuchcase").status_code == 404
        for escape in ("../../etc/passwd", "..", "a/b", "%2e%2e/x"):
            r = h.post(url + "/infer/vessa", params={"image": escape})
            assert r.status_code == 400, (escape, r.text)
        r = h.get(url + "/datastore/image", params={"image": "../study/dataset.json"})
        assert r.status_code == 400 and "leave the datastore" in r.json()["detail"]
        r = h.post(url + "/infer/vessa?image=synth000", data={"params": json.dumps({"result_extension": ".mha"})})
        assert r.status_code == 400
        r = h.post(url + "/infer/vessa?image=synth000", data={"params": "not json"})
        assert r.status_code == 400
        r = h.post(url + "/infer/vessa", files={"file": ("x.nii.gz", b"not an image")})
        assert r.status_code == 400
        assert h.post(url + "/activelearning/nope", json={}).status_code == 404
        assert h.get(url + "/datastore/label", params={"label": "synth003", "tag": "final"}).status_code == 404

        # malformed labels: not NIfTI/NRRD, the wrong voxel grid, values that are no class, a segment
        # name that is no class; none of them is saved
        image = _image(ml, "synth003")
        bad_labels = {
            "garbage": b"\x00" * 400,
            "shape": None,
            "values": None,
            "nrrd-truncated": write_nrrd(np.zeros(image.shape, np.uint8), image.affine)[:-50],
        }
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.uint8), image.affine), label)
        bad_labels["shape"] = label.read_bytes()
        wrong = np.zeros(image.shape, np.uint8)
        wrong[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(wrong, image.affine), label)
        bad_labels["values"] = label.read_bytes()
        for what, data in bad_labels.items():
            r = h.put(url + "/datastore/label", params={"image": "synth003"}, files={"label": ("l.nii.gz", data)})
            assert r.status_code == 400, (what, r.text)
            assert r.json()["detail"], what
        one = np.zeros(image.shape, np.uint8)
        one[1, 1, 1] = 1
        r = h.put(
            url + "/datastore/label",
            params={"image": "synth003"},
            data={"params": json.dumps({"label_info": [{"name": "Tumour", "idx": 1}]})},
            files={"label": ("l.nrrd", write_nrrd(one, image.affine))},
        )
        assert r.status_code == 400 and "Tumour" in r.json()["detail"]
        r = h.put(url + "/datastore/label", params={"image": "../x"}, files={"label": ("l.nii.gz", bad_labels["values"])})
        assert r.status_code == 400
        nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), label)
        r = h.put(url + "/datastore/label", params={"image": "synth003", "tag": "a/b"}, files={"label": ("l.nii.gz", label.read_bytes())})
        assert r.status_code == 400
        # an upload of something that is no image is refused, and a dataset image cannot be deleted
        r = h.put(url + "/datastore/image", params={"image": "new1"}, files={"file": ("new1.nii.gz", b"junk")})
        assert r.status_code == 400
        assert h.delete(url + "/datastore/image", params={"id": "synth000"}).status_code == 409
        assert h.delete(url + "/datastore/label", params={"id": "synth000", "tag": "original"}).status_code == 409
        after = h.get(url + "/datastore/?output=all").json()
        assert after["objects"].keys() == before["objects"].keys()
        assert after["objects"]["synth003"]["labels"] == before["objects"]["synth003"]["labels"]
        assert not reviews.review_path(ml["out"], "synth003").exists()


def test_datastore_upload_infer_and_delete_an_image(ml):
    url = ml["url"]
    image = _image(ml, "synth000")
    data = (ml["study"] / "imagesTr" / "synth000_0000.nii.gz").read_bytes()
    with httpx.Client(timeout=120, headers=AUTH) as h:
        r = h.put(url + "/datastore/image", params={"image": "uploaded1"}, data={"params": "{}"}, files={"file": ("x.nii.gz", data)})
        assert r.status_code == 200 and r.json() == {"image": "uploaded1"}
        assert h.put(url + "/datastore/image", params={"image": "uploaded1"}, files={"file": ("x.nii.gz", data)}).status_code == 409
        assert "uploaded1" in h.get(url + "/datastore/?output=all").json()["objects"]
        r = h.post(url + "/infer/vessa?image=uploaded1&output=json")
        assert r.status_code == 200 and r.json()["image"] == "uploaded1"
        # an uploaded file is pseudo-labeled without entering the datastore; output=image is the file alone
        r = h.post(url + "/infer/vessa?output=image", files={"file": ("case.nii.gz", data)})
        assert r.status_code == 200
        out = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(r.content))
        assert out.shape == image.shape
        r = h.put(url + "/datastore/image/info", params={"image": "uploaded1"}, data={"info": json.dumps({"note": "x"})})
        assert r.status_code == 200 and r.json()["note"] == "x"
        assert h.delete(url + "/datastore/image", params={"id": "uploaded1"}).status_code == 200
        assert h.get(url + "/datastore/image", params={"image": "uploaded1"}).status_code == 404


def test_eight_clients_infer_at_once_while_info_answers(ml):
    """8 clients call infer at once on 2 replicas: all finish; GET /info/ answers in under a second
    while they run (a MONAI Label server's one worker would hold it behind the inferences)."""
    results: list = []
    errors: list = []

    def one(i: int) -> None:
        try:
            _, params = client(ml).infer("vessa", f"synth00{i % 4}", {})
            results.append(params)
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    info_times = []
    with httpx.Client(timeout=30, headers=AUTH) as h:
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            assert h.get(ml["url"] + "/info/").status_code == 200
            info_times.append(time.perf_counter() - t0)
            time.sleep(0.1)
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    assert info_times and max(info_times) < 1.0, info_times

"""The review page in a real headless browser (Debian's Chromium driven by Playwright) against a live
service: a real Serve ingress with the API token set, a real labeling job (runner actor, dispatcher,
redis-server) finished over REST, then everything a reviewer does, checked back through the REST API.

A second job over a 4D synthetic cine checks the viewer's frame control: the page shows frame t's image
and label, pixel for pixel the overlay rendered here from the cine and its (corrected) 4D label.

Screenshots of the three views (and review_cine.png, the cine viewer) go to $VESSA_REVIEW_SCREENSHOTS
when it is set (docs/review.md, docs/dicom.md)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from services.ingress.client import AssistantClient
from tests.helpers import SERVE_TEST_ARGS, SMALL, copy_bank, start_dispatcher, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOKEN = "review-test-token-0123456789"
N_CASES = 4


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("no Chromium on PATH: apt-get install chromium (scripts/bootstrap.sh does)")


@pytest.fixture(scope="module")
def review_service(serve_app, tiny_bank, tmp_path_factory, synth_dir):
    """An ingress with jobs on and VESSA_API_TOKEN set, at /reviewapp; a job over 4 cases, finished."""
    from ray import serve

    from services.ingress.app import build_app
    from services.runtime.redis_server import EmbeddedRedis

    base = tmp_path_factory.mktemp("review")
    root, out_root = base / "data", base / "labels"
    study = root / "study"
    study.mkdir(parents=True)
    truth = {}
    for path in sorted((synth_dir / "imagesTr").glob("*.nii.gz"))[:N_CASES]:
        img = nib.load(path)
        case = path.name.replace("_0000.nii.gz", "")
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, :4].copy(), img.affine, img.header), study / f"{case}.nii.gz")
        lab = nib.load(synth_dir / "labelsTr" / f"{case}.nii.gz")
        truth[case] = nib.Nifti1Image(np.asanyarray(lab.dataobj)[:, :, :4].astype(np.uint8), img.affine, img.header)
    redis_server = EmbeddedRedis(base / "redis").start()
    bank = copy_bank(tiny_bank, base / "bank")
    args = {
        **SERVE_TEST_ARGS,
        "bank": str(bank),
        "redis_url": redis_server.url,
        "data_root": str(root),
        "job_output_root": str(out_root),
        "api_token": TOKEN,
    }
    serve.run(build_app(args, {"VessaAssistant": dict(SMALL), "VessaIngress": dict(SMALL)}), name="vessa_review", route_prefix="/reviewapp")
    url = serve_app.url + "/reviewapp"
    wait_ready(url, 600)
    disp = start_dispatcher(redis_server.url, serve_app.gcs_address, base / "d.log")
    client = AssistantClient(url, token=TOKEN)
    job = client.label_dataset("study", selection="all", batch_slices=4)
    done = client.wait_job(job["job_id"], timeout=600, poll_s=0.5)
    assert done["state"] == "done" and done["counts"]["labeled"] == N_CASES, done
    yield {"url": url, "client": client, "job_id": job["job_id"], "out": Path(job["out"]), "truth": truth, "base": base}
    client.close()
    disp.terminate()
    disp.wait(30)
    serve.delete("vessa_review")
    redis_server.stop()


def test_review_page_ranks_views_approves_corrects_and_grows_the_bank(review_service, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # a loaded 2-core machine renders a slice in seconds, not ms

    svc, client, job_id = review_service, review_service["client"], review_service["job_id"]
    shots = Path(os.environ["VESSA_REVIEW_SCREENSHOTS"]) if os.environ.get("VESSA_REVIEW_SCREENSHOTS") else None
    ranked = [c["case_id"] for c in client.job_cases(job_id)["cases"]]
    assert len(ranked) == N_CASES
    bank_before = client.templates()["version"]

    # Without the token: the page is only the login form, and its data routes answer 401.
    assert httpx.get(svc["url"] + "/ui/").status_code == 200
    for path in (f"/v1/jobs/{job_id}/cases", f"/v1/jobs/{job_id}/cases/{ranked[0]}/slices/0.png", "/v1/jobs"):
        assert httpx.get(svc["url"] + path).status_code == 401, path

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(svc["url"] + "/ui/")
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#app")).to_be_hidden()
        assert page.locator("#jobs tbody tr").count() == 0
        page.fill("#token", "wrong-token")
        page.click("#login-form button")
        expect(page.locator("#login-error")).to_contain_text("refused")
        expect(page.locator("#app")).to_be_hidden()
        page.fill("#token", TOKEN)
        page.click("#login-form button")

        # Jobs: the finished job with its state.
        row = page.locator(f"#jobs tr[data-job='{job_id}']")
        expect(row).to_contain_text("done")
        if shots:
            page.screenshot(path=str(shots / "review-jobs.png"))
        row.locator("a").click()

        # Cases in ranking order (least trusted first), each with a thumbnail.
        expect(page.locator("#cases tbody tr")).to_have_count(N_CASES)
        assert page.locator("#cases tbody tr").evaluate_all("rows => rows.map(r => r.dataset.case)") == ranked
        expect(page.locator("#cases img.thumb[src^='blob:']")).to_have_count(N_CASES)
        assert all(page.locator("#cases img.thumb").evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 0)"))
        if shots:
            page.screenshot(path=str(shots / "review-cases.png"))

        # The viewer: step through slices with the keyboard and the buttons.
        page.locator(f"#cases tr[data-case='{ranked[0]}'] a").click()
        expect(page.locator("#viewer-case")).to_have_text(ranked[0])
        img = page.locator("#slice-img")
        expect(img).to_have_attribute("src", re.compile("^blob:"))
        seen = set()
        page.locator("#slice").evaluate("el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
        page.evaluate("document.activeElement.blur()")  # keys go to the page, not the slider
        expect(img).to_have_attribute("data-z", "0")
        for z in range(1, 4):
            page.keyboard.press("ArrowUp")
            expect(img).to_have_attribute("data-z", str(z))
            expect(page.locator("#slice-label")).to_have_text(f"slice {z + 1} / 4")
            seen.add(page.evaluate("document.getElementById('slice-img').src"))
        page.keyboard.press("ArrowUp")  # past the last slice: stays
        expect(img).to_have_attribute("data-z", "3")
        page.keyboard.press("ArrowDown")
        expect(img).to_have_attribute("data-z", "2")
        assert len(seen) == 3
        expect(page.locator("#slice-conf tbody tr")).to_have_count(4)
        expect(page.locator("#slice-conf tbody tr.current")).to_have_attribute("data-z", "2")
        # per-class toggle and opacity redraw the slice
        before = img.get_attribute("src")
        page.locator("#class-toggles input").first.uncheck()
        expect(img).not_to_have_attribute("src", before)
        if shots:
            page.screenshot(path=str(shots / "review-viewer.png"))

        # Approve the least trusted case.
        page.fill("#comment", "looks right")
        page.click("#approve")
        expect(page.locator("#review-state")).to_have_text("approved")

        # Next case (n): upload a corrected label (the ground truth, as an expert would draw it).
        page.keyboard.press("n")
        expect(page.locator("#viewer-case")).to_have_text(ranked[1])
        corrected = tmp_path / f"{ranked[1]}.nii.gz"
        nib.save(svc["truth"][ranked[1]], corrected)
        page.set_input_files("#label-file", str(corrected))
        page.click("#upload-form button")
        expect(page.locator("#review-state")).to_have_text("corrected (v1)")

        # Back to the cases: add both to the bank.
        page.goto(svc["url"] + f"/ui/#/jobs/{job_id}")
        expect(page.locator("#cases tbody tr")).to_have_count(N_CASES)
        page.click("#add-to-bank")
        expect(page.locator("#bank-result")).to_contain_text("2 cases added")
        expect(page.locator(f"#cases tr[data-case='{ranked[0]}'] td.review")).to_contain_text("approved")
        assert not errors, errors
        browser.close()

    # Through the REST API: the review states are stored and the bank version went up.
    cases = {c["case_id"]: c for c in client.job_cases(job_id)["cases"]}
    assert cases[ranked[0]]["review"] == "approved" and cases[ranked[1]]["review"] == "corrected"
    assert cases[ranked[1]]["versions"] == 1
    assert cases[ranked[2]]["review"] == "unreviewed" and cases[ranked[2]]["in_bank"] is None
    bank_after = client.templates()
    assert bank_after["version"] > bank_before
    # each added case is a new bank version; the last one is the bank's
    in_bank = sorted(cases[c]["in_bank"] for c in ranked[:2])
    assert bank_before < in_bank[0] < in_bank[1] == bank_after["version"], (bank_before, in_bank, bank_after["version"])
    added_cases = {t["case_id"] for t in bank_after["templates"] if t["case_id"].startswith(job_id)}
    assert len(added_cases) == 2
    # the automatic label and the reviewed one are kept apart
    out = svc["out"]
    assert (out / "reviewed" / f"{ranked[1]}.v1.nii.gz").is_file() and (out / "labels" / f"{ranked[1]}.nii.gz").is_file()
    stored = np.asanyarray(nib.load(out / "reviewed" / f"{ranked[1]}.v1.nii.gz").dataobj)
    assert np.array_equal(stored, np.asanyarray(svc["truth"][ranked[1]].dataobj))
    # adding again adds nothing twice
    again = client.add_job_to_bank(job_id)
    assert again["added"] == {} and all("already in the bank" in v for k, v in again["skipped"].items() if k in ranked[:2])


def test_review_routes_refuse_bad_input_with_4xx(review_service, tmp_path):
    svc, job_id = review_service, review_service["job_id"]
    http = httpx.Client(base_url=svc["url"], headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
    case = http.get(f"/v1/jobs/{job_id}/cases").json()["cases"][-1]["case_id"]
    base = f"/v1/jobs/{job_id}/cases/{case}"
    assert http.get(f"/v1/jobs/{job_id}/cases/no-such-case").status_code == 404
    assert http.get(f"/v1/jobs/{job_id}/cases/..%2F..%2Fetc").status_code == 404
    assert http.get(f"{base}/slices/99.png").status_code == 404
    assert http.get(f"{base}/slices/0.png", params={"opacity": 3}).status_code == 422
    assert http.get(f"{base}/slices/0.png", params={"label": "reviewed"}).status_code == 404  # none yet
    assert http.post(f"{base}/review", json={"state": "corrected"}).status_code == 422
    assert http.post(f"{base}/review", json={"state": "approved", "extra": 1}).status_code == 422
    r = http.post(f"{base}/label", files={"file": ("x.nii.gz", b"not a nifti", "application/gzip")})
    assert r.status_code == 400 and "NIfTI" in r.json()["detail"]
    img = nib.load(svc["base"] / "data" / "study" / f"{case}.nii.gz")
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape[:2] + (2,), np.uint8), img.affine), wrong)
    r = http.post(f"{base}/label", files={"file": ("w.nii.gz", wrong.read_bytes(), "application/gzip")})
    assert r.status_code == 400 and "shape" in r.json()["detail"]
    nib.save(nib.Nifti1Image(np.full(img.shape, 9, np.uint8), img.affine), wrong)
    r = http.post(f"{base}/label", files={"file": ("w.nii.gz", wrong.read_bytes(), "application/gzip")})
    assert r.status_code == 400 and "not classes" in r.json()["detail"]
    png = http.get(f"{base}/slices/1.png", params={"classes": "", "centre": 0.4, "width": 0.5})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert http.get(f"{base}/thumbnail.png").status_code == 200
    http.close()


CINE_FRAMES, CINE_DEPTH = 4, 4


def _shown_pixels(page) -> np.ndarray:
    """The slice image the page shows, decoded by the browser: (H, W, 3) uint8."""
    page.wait_for_function("() => { const i = document.getElementById('slice-img'); return i.complete && i.naturalWidth > 0; }")
    w, h, data = page.evaluate(
        """() => { const i = document.getElementById('slice-img'); const c = document.createElement('canvas');
        c.width = i.naturalWidth; c.height = i.naturalHeight; const x = c.getContext('2d'); x.drawImage(i, 0, 0);
        return [c.width, c.height, Array.from(x.getImageData(0, 0, c.width, c.height).data)]; }"""
    )
    return np.asarray(data, np.uint8).reshape(h, w, 4)[..., :3]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def test_review_page_steps_through_a_cine_frame_by_frame(review_service, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from services.labeling.cases import case_input, read_cine_case
    from services.labeling.render import overlay
    from shared.data.cine import load_cine_labels, write_cine_dataset

    expect.set_options(timeout=30_000)
    svc, client = review_service, review_service["client"]
    shots = Path(os.environ["VESSA_REVIEW_SCREENSHOTS"]) if os.environ.get("VESSA_REVIEW_SCREENSHOTS") else None
    folder = svc["base"] / "data" / "cine"
    (cid,) = write_cine_dataset(folder, cases=1, frames=CINE_FRAMES, depth=CINE_DEPTH)
    job = client.label_dataset("cine", selection="all", batch_slices=4)
    job_id = job["job_id"]
    done = client.wait_job(job_id, timeout=600, poll_s=0.5)
    assert done["state"] == "done" and done["counts"]["labeled"] == 1, done

    # The case list and the ranking carry each frame's confidence and the least trusted frame.
    (row,) = client.job_cases(job_id)["cases"]
    assert [f["frame"] for f in row["frames"]] == list(range(CINE_FRAMES))
    conf = {f["frame"]: f["confidence"] for f in row["frames"]}
    assert row["worst_frame"] == min(conf, key=lambda t: (conf[t], t))
    (ranked,) = client.job_ranking(job_id)["ranking"]
    assert ranked["worst_frame"] == row["worst_frame"] and len(ranked["frames"]) == CINE_FRAMES
    shown = {s["index"] for s in row["classes"].values()}

    # What frame t, slice z must look like once the ground truth is uploaded as the correction.
    frames = read_cine_case(case_input(cid, folder / f"{cid}.nii.gz"))
    truth = load_cine_labels(folder / "truth" / f"{cid}.nii.gz", frames)
    z = CINE_DEPTH // 2

    def expected(t: int) -> np.ndarray:
        return overlay(frames[t].image[z], truth[t][z], 0.45, shown, 0.5, 1.0)

    # the beating heart: frames 0 and 2 differ in image and in label at this slice
    assert not np.array_equal(frames[0].image[z], frames[2].image[z])
    assert not np.array_equal(truth[0][z], truth[2][z])
    assert not _same(expected(0), expected(2))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(svc["url"] + f"/ui/#/jobs/{job_id}")
        page.fill("#token", TOKEN)
        page.click("#login-form button")
        case_row = page.locator(f"#cases tr[data-case='{cid}']")
        expect(case_row).to_contain_text(f"{CINE_FRAMES} frames · worst t={row['worst_frame']}")
        expect(case_row.locator("img.thumb[src^='blob:']")).to_have_count(1)
        case_row.locator("a").click()

        # The viewer opens on the least trusted frame, with a frame control.
        img = page.locator("#slice-img")
        expect(page.locator("#frame-nav")).to_be_visible()
        expect(img).to_have_attribute("data-t", str(row["worst_frame"]))
        expect(page.locator("#slice-conf tbody tr")).to_have_count(CINE_DEPTH)

        # Correct the whole cine with its ground truth (a 4D NIfTI), as an expert would.
        page.set_input_files("#label-file", str(folder / "truth" / f"{cid}.nii.gz"))
        page.click("#upload-form button")
        expect(page.locator("#review-state")).to_have_text("corrected (v1)")

        page.locator("#frame").evaluate("el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
        page.locator("#slice").evaluate(f"el => {{ el.value = '{z}'; el.dispatchEvent(new Event('input')); }}")
        page.evaluate("document.activeElement.blur()")
        expect(img).to_have_attribute("data-t", "0")
        expect(img).to_have_attribute("data-z", str(z))
        expect(page.locator("#frame-label")).to_contain_text(f"frame 1 / {CINE_FRAMES}")
        assert _same(_shown_pixels(page), expected(0))

        # ] and → step forward in time, [ and ← back; the slice stays; the image and label are frame t's.
        page.keyboard.press("]")
        expect(img).to_have_attribute("data-t", "1")
        page.keyboard.press("ArrowRight")
        expect(img).to_have_attribute("data-t", "2")
        expect(img).to_have_attribute("data-z", str(z))
        expect(page.locator("#frame-label")).to_contain_text(f"frame 3 / {CINE_FRAMES}")
        at2 = _shown_pixels(page)
        assert _same(at2, expected(2)) and not _same(at2, expected(0))
        page.keyboard.press("ArrowLeft")
        expect(img).to_have_attribute("data-t", "1")
        assert _same(_shown_pixels(page), expected(1))
        page.click("#next-frame")
        page.click("#next-frame")
        expect(img).to_have_attribute("data-t", "3")
        page.keyboard.press("]")  # past the last frame: stays
        expect(img).to_have_attribute("data-t", "3")
        page.click("#prev-frame")
        expect(img).to_have_attribute("data-t", "2")
        # ↑/↓ still step slices within the frame; the confidence rows are the frame's
        page.keyboard.press("ArrowDown")
        expect(img).to_have_attribute("data-z", str(z - 1))
        expect(img).to_have_attribute("data-t", "2")
        expect(page.locator("#slice-conf tbody tr.current")).to_have_attribute("data-z", str(z - 1))
        page.keyboard.press("ArrowUp")
        expect(img).to_have_attribute("data-z", str(z))
        if shots:
            page.screenshot(path=str(shots / "review_cine.png"))
        assert not errors, errors
        browser.close()

    # Over REST: frames outside the cine are 404, a 3D correction of a cine a 400, a cine is not banked.
    http = httpx.Client(base_url=svc["url"], headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
    base = f"/v1/jobs/{job_id}/cases/{cid}"
    assert http.get(f"{base}/slices/0.png", params={"t": CINE_FRAMES}).status_code == 404
    assert http.get(f"{base}/slices/0.png", params={"t": CINE_FRAMES - 1}).status_code == 200
    flat = tmp_path / "flat.nii.gz"
    src = nib.load(folder / f"{cid}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(src.shape[:3], np.uint8), src.affine), flat)
    r = http.post(f"{base}/label", files={"file": ("flat.nii.gz", flat.read_bytes(), "application/gzip")})
    assert r.status_code == 400 and f"{CINE_FRAMES} frames" in r.json()["detail"], r.text
    http.close()
    res = client.add_job_to_bank(job_id)
    assert res["added"] == {} and "cine" in res["skipped"][cid]

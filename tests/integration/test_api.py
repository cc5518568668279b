"""The REST API over real HTTP against a real local Ray Serve application (tiny encoder, CPU)."""

from __future__ import annotations

import gzip
import io

import httpx
import nibabel as nib
import numpy as np
import pytest

from services.ingress.client import AssistantAPIError, AssistantClient, AsyncAssistantClient
from services.ingress.uploads import nifti_bytes, read_nifti_array
from shared.data import open_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(serve_app):
    c = AssistantClient(serve_app.url, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def volume(synth_dir):
    """A synthetic validation volume in NIfTI (x, y, z) order, its affine and zooms."""
    ds = open_dataset(synth_dir)
    case = ds.volume_ids("val")[0]
    vol = ds.read_volume(case, "val")
    img = nib.load(str(next((synth_dir / "imagesTr").glob(f"{case}_0000.nii.gz"))))
    return np.asanyarray(img.dataobj), img.affine, img.header.get_zooms(), vol


def test_nifti_volume_round_trip(client, volume):
    arr, affine, zooms, _ = volume
    result = client.pseudo_labels(nifti_bytes(arr, affine, zooms))
    out, out_affine, header = read_nifti_array(result.nifti)
    assert out.shape == arr.shape
    assert np.allclose(out_affine, affine)
    assert out.dtype == np.uint8 and header.get_data_dtype() == np.uint8
    assert set(np.unique(out)) <= {0, 1, 2, 3}
    # one confidence row per slice along the through-plane axis (largest spacing), background first
    axis = int(np.argmax(zooms[:3]))
    assert result.meta["axis"] == axis
    assert len(result.meta["confidence"]) == arr.shape[axis]
    conf = np.array(result.meta["confidence"], dtype=float)
    assert conf.shape == (arr.shape[axis], 4) and np.all((conf >= 0) & (conf <= 1))
    assert result.headers["x-vessa-bank-version"] == str(result.meta["bank_version"])


def test_uncompressed_nifti_and_explicit_axis(client, volume):
    arr, affine, zooms, _ = volume
    arr = np.ascontiguousarray(arr[:20])  # axis 0 of the full volume would mean ~200 slices
    raw = gzip.decompress(nifti_bytes(arr, affine, zooms))
    result = client.pseudo_labels(raw, axis=0, classes="LV")
    assert result.nifti[:2] != b"\x1f\x8b"  # .nii in, .nii out
    assert result.meta["axis"] == 0 and len(result.meta["confidence"]) == arr.shape[0]
    assert set(np.unique(result.labels)) <= {0, 3}
    assert all(row[1] is None and row[3] is not None for row in result.meta["confidence"])


def test_npy_batch_with_student_probs_and_probs_out(client, volume):
    _, _, _, vol = volume
    slices = vol.image[:3].astype(np.float32)
    probs = np.full((3, 4, *slices.shape[1:]), 0.25, dtype=np.float32)
    result = client.pseudo_labels(slices, probs=probs, return_probs=True)
    assert result.labels.shape == slices.shape and result.labels.dtype == np.uint8
    assert result.probs.shape == (3, 4, *slices.shape[1:]) and result.probs.dtype == np.uint8


def test_segment_with_a_box(client, volume):
    _, _, _, vol = volume
    image = vol.image[vol.image.shape[0] // 2]
    h, w = image.shape
    mask, conf = client.segment(
        image, "LV", box=[w * 0.3, h * 0.3, w * 0.7, h * 0.7], points=[[w / 2, h / 2]], point_labels=[1]
    )
    assert mask.shape == image.shape and mask.dtype == bool
    assert 0.0 <= conf <= 1.0


def test_templates_add_changes_version_and_delete(client, synth_dir, volume):
    arr, affine, zooms, _ = volume
    before = client.info()["bank_version"]
    label_file = next((synth_dir / "labelsTr").glob("*.nii.gz"))
    image_file = synth_dir / "imagesTr" / label_file.name.replace(".nii.gz", "_0000.nii.gz")
    classes = [
        {"index": 0, "name": "background"},
        {"index": 1, "name": "RV"},
        {"index": 2, "name": "Myo"},
        {"index": 3, "name": "LV"},
    ]
    out = client.add_template(image_file, label_file, classes, case_id="added_case")
    assert out["version"] == before + 1 and out["added"]
    info = client.info()
    assert info["bank_version"] == before + 1
    ids = {t["id"] for t in client.templates()["templates"]}
    assert set(out["added"]) <= ids
    # the new version serves: a request reports it
    assert client.pseudo_labels(nifti_bytes(_few_slices(arr), affine, zooms)).meta["bank_version"] == before + 1
    removed = client.remove_template(out["added"][0])
    assert removed["version"] == before + 2
    with pytest.raises(AssistantAPIError) as err:
        client.remove_template(out["added"][0])
    assert err.value.status == 404
    with pytest.raises(AssistantAPIError) as err:  # a changed class table is refused
        client.add_template(image_file, label_file, classes[:3], case_id="other")
    assert err.value.status == 400 and "class table" in err.value.detail


def _few_slices(arr: np.ndarray, n: int = 3) -> np.ndarray:
    """The first n slices of a volume along its through-plane axis (z, the last): a whole volume that
    costs the CPU decoder a quarter of the full one (12 slices). For requests that show the service
    answers, after the bank changed (no cached answers apply) or after bad input."""
    return np.ascontiguousarray(arr[..., :n])


def _post(url: str, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/pseudo-labels", timeout=60, **kw)


def _npy(arr) -> bytes:
    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


@pytest.mark.parametrize(
    "files,data,status,needle",
    [
        ({"file": ("a.txt", b"hello, not an image at all" * 20)}, {}, 400, "NIfTI"),
        ({"file": ("a.npy", b"\x93NUMPY garbage")}, {}, 400, ".npy"),
        ({"file": ("a.nii", b"")}, {}, 400, "empty"),
        ({"file": ("a.npy", _npy(np.zeros((2, 2, 2, 2, 2), np.float32)))}, {}, 400, "dimensions"),
        ({"file": ("a.npy", _npy(np.zeros((1, 64, 64, 3), np.float32)))}, {}, 400, "(B, H, W)"),
        ({"file": ("a.npy", _npy(np.full((64, 64), np.nan, np.float32)))}, {}, 400, "NaN"),
        ({"file": ("a.npy", _npy(np.zeros((0, 64, 64), np.float32)))}, {}, 400, "empty"),
        (
            {"file": ("a.npy", _npy(np.zeros((64, 64), np.float32)))},
            {"classes": "spleen"},
            400,
            "unknown class",
        ),
        (
            {
                "file": ("a.npy", _npy(np.zeros((2, 64, 64), np.float32))),
                "probs": ("p.npy", _npy(np.zeros((2, 4, 32, 32), np.float32))),
            },
            {},
            400,
            "do not match",
        ),
        (
            {
                "file": ("a.npy", _npy(np.zeros((1, 64, 64), np.float32))),
                "probs": ("p.npy", _npy(np.full((1, 4, 64, 64), 2.0, np.float32))),
            },
            {},
            400,
            "[0, 1]",
        ),
        ({"file": ("a.npy", _npy(np.zeros((64, 64), object)))}, {}, 400, "not allowed"),
    ],
)
def test_bad_input_gets_4xx_with_a_message(serve_app, files, data, status, needle):
    r = _post(serve_app.url, files=files, data=data)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_wrong_content_type_and_missing_file(serve_app):
    r = httpx.post(
        serve_app.url + "/v1/pseudo-labels",
        content=b"{}",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 422
    r = httpx.post(
        serve_app.url + "/v1/segment",
        files={"image": ("i.npy", _npy(np.zeros((64, 64), np.float32)))},
        data={"prompt": "{bad json"},
        timeout=30,
    )
    assert r.status_code == 400 and "JSON" in r.json()["detail"]
    r = httpx.post(
        serve_app.url + "/v1/segment",
        files={"image": ("i.npy", _npy(np.zeros((64, 64), np.float32)))},
        data={"prompt": '{"class": "LV", "box": [10, 10, 500, 20]}'},
        timeout=30,
    )
    assert r.status_code == 400 and "box" in r.json()["detail"]


def test_too_large_is_413(serve_app):
    big = np.zeros((3, 1024, 1024), np.float32)  # 12 MiB > the 8 MiB test limit
    r = _post(serve_app.url, files={"file": ("big.npy", _npy(big))})
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_path_traversal_in_template_ids(serve_app):
    for bad in ["..%2F..%2Fetc%2Fpasswd", "a.b", "x" * 70]:
        r = httpx.delete(serve_app.url + f"/v1/templates/{bad}", timeout=30)
        assert r.status_code in (400, 404), (bad, r.status_code)
    assert serve_app.bank.joinpath("manifest.json").exists()


def test_replica_keeps_serving_after_bad_input(client, volume):
    arr, affine, zooms, _ = volume
    for _ in range(3):
        _post(client.http.base_url.__str__().rstrip("/"), files={"file": ("a.nii", b"\x00" * 400)})
    few = _few_slices(arr)
    assert client.pseudo_labels(nifti_bytes(few, affine, zooms)).labels.shape == few.shape


def test_token_required_when_set(serve_app):
    assert httpx.get(serve_app.auth_url + "/healthz", timeout=10).status_code == 200
    assert httpx.get(serve_app.auth_url + "/readyz", timeout=30).status_code == 200
    r = httpx.get(serve_app.auth_url + "/v1/info", timeout=10)
    assert r.status_code == 401
    r = httpx.get(serve_app.auth_url + "/v1/info", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401
    assert httpx.get(serve_app.auth_url + "/docs", timeout=10).status_code == 401
    ok = AssistantClient(serve_app.auth_url, token=serve_app.token, timeout=60)
    assert ok.info()["service"] == "vessa"
    ok.close()


def test_metrics_and_info(serve_app, client):
    info = client.info()
    for key in ("model", "bank_version", "classes", "device", "replica"):
        assert key in info
    text = httpx.get(serve_app.url + "/metrics", timeout=30).text
    assert "vessa_http_requests_total" in text and "vessa_http_request_seconds_bucket" in text
    assert "vessa_replica_batch_count" in text
    assert httpx.get(serve_app.url + "/openapi.json", timeout=10).json()["info"]["title"] == "VESSA"


def test_replica_threads_change_in_place(serve_app, client, volume):
    """`reconfigure({"torch_threads": n})` (what `vessa demo` does while a trainer shares the cores):
    the same replica, its embedding cache kept, now running its model calls with n threads."""
    from ray import serve

    _, _, _, vol = volume
    image = vol.image[:1].astype(np.float32)
    client.pseudo_labels(image)
    before = client.info()
    handle = serve.get_deployment_handle("VessaAssistant", app_name="vessa")
    try:
        handle.reconfigure.remote({"torch_threads": 1}).result(timeout_s=30)
        after = client.info()
        assert after["torch_threads"] == 1 and after["replica"] == before["replica"]
        client.pseudo_labels(image)  # a model call under the new setting; the slice is still cached
        encoded = client.info()["stats"]["encoded"]
        assert encoded == before["stats"]["encoded"]
    finally:
        handle.reconfigure.remote({"torch_threads": None}).result(timeout_s=30)
    assert client.info()["torch_threads"] is None


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_async_client(serve_app, volume):
    _, _, _, vol = volume
    c = AsyncAssistantClient(serve_app.url, timeout=60)
    try:
        res = await c.pseudo_labels(vol.image[:2].astype(np.float32))
        assert res.labels.shape == vol.image[:2].shape
        assert await c.ready()
    finally:
        await c.aclose()


def test_a_pseudo_label_calls_time_limit_grows_with_its_slices(serve_app, tiny_bank, tmp_path, volume):
    """A 3D scan that takes longer than the base limit gets its answer: the ingress gives each call
    request_timeout_s + request_timeout_per_slice_s per slice. Two apps on the session's Ray with a base
    limit far below what the volume takes (tiny model on the CPU): without the per-slice share the call
    is a 504 that names the limit; with it, the label map."""
    from ray import serve

    from services.ingress.app import build_app
    from tests.helpers import ASSISTANT_TEST_OPTIONS, SERVE_TEST_ARGS, SMALL, copy_bank, wait_ready

    arr, affine, zooms, _ = volume
    deployments = {"VessaAssistant": dict(ASSISTANT_TEST_OPTIONS), "VessaIngress": dict(SMALL)}
    for name, per_slice in (("tight", 0.0), ("grows", 5.0)):
        bank = copy_bank(tiny_bank, tmp_path / name / "bank")
        args = {**SERVE_TEST_ARGS, "bank": str(bank), "request_timeout_s": 0.01, "request_timeout_per_slice_s": per_slice}
        serve.run(build_app(args, deployments), name=f"vessa_{name}", route_prefix=f"/{name}")
        wait_ready(f"{serve_app.url}/{name}")
    try:
        payload = nifti_bytes(arr, affine, zooms)
        tight = httpx.post(f"{serve_app.url}/tight/v1/pseudo-labels", files={"file": ("v.nii.gz", payload)}, timeout=120)
        assert tight.status_code == 504, tight.text
        assert "did not answer within 0.01 s" in tight.json()["detail"]
        result = AssistantClient(f"{serve_app.url}/grows", timeout=120).pseudo_labels(payload)
        out, _, _ = read_nifti_array(result.nifti)
        assert out.shape == arr.shape
    finally:
        for name in ("tight", "grows"):
            serve.delete(f"vessa_{name}")

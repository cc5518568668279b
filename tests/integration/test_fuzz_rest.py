"""Bad input over real HTTP against the session's Ray Serve app: every REST route, hypothesis-driven.

Whatever arrives, the answer is a 2xx or a 4xx with a `detail` that says what is wrong: never a 5xx,
never a hang (each request has a client timeout; the tests have pytest-timeout). Valid inputs are kept
small (a tiny-encoder inference per slice costs real CPU time), so most examples exercise the
validators. Raw-socket tests cover requests whose headers lie (Content-Length).
"""

from __future__ import annotations

import io
import json
import socket
import time
import urllib.parse

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from services.ingress.client import parse_multipart
from shared.wire.arrays import read_npy, write_npy
from tests.unit.shared.test_fuzz_decoders import BASE_N1, nifti_bytes_st

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HTTP = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def http(serve_app):
    with httpx.Client(base_url=serve_app.url, timeout=TIMEOUT) as c:
        yield c


def _npy(arr) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=False)
    return b.getvalue()


def _ok_or_4xx(r: httpx.Response) -> None:
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        detail = r.json()["detail"]
        assert detail, r.text
        if r.status_code != 422:  # FastAPI's own validation errors: a list of {loc, msg}
            assert isinstance(detail, str) and detail.strip()


# ---------------------------------------------------------------------------------------------- strategies
def small_images():
    return st.sampled_from(["uint8", "int16", "float32", "float64", "bool", ">f4"]).flatmap(
        lambda dt: hnp.arrays(
            np.dtype(dt),
            st.sampled_from([(16, 16), (1, 12, 16), (2, 8, 8), (0, 16, 16), (4, 4), (16,), (1, 1, 16, 16), (8, 3000)]),
            elements=hnp.from_dtype(np.dtype(dt), allow_nan=True, allow_infinity=True)
            if np.dtype(dt).kind == "f"
            else None,
        )
    )


def garbage_files():
    return st.one_of(
        st.binary(max_size=2000),
        st.binary(max_size=300).map(lambda b: b"\x93NUMPY" + b),
        st.binary(max_size=300).map(lambda b: b"\x1f\x8b" + b),
        nifti_bytes_st,
        st.integers(1, len(BASE_N1) - 1).map(lambda n: BASE_N1[:n]),
        small_images().map(_npy),
        small_images().map(lambda a: _npy(a)[: max(1, len(_npy(a)) // 2)]),
    )


file_names = st.sampled_from(["a.npy", "a.nii", "a.nii.gz", "", "../../../etc/passwd", "x.txt", "ünï.npy", "a" * 300])
class_specs = st.none() | st.sampled_from(["LV", "lv,rv", "3", "²", "٣", "-1", "0", "background", "spleen", "", ",", "1,1", "9" * 30]) | st.text(max_size=12)
prob_files = st.none() | st.one_of(
    hnp.arrays(
        np.float32,
        st.sampled_from([(1, 4, 16, 16), (4, 16, 16), (1, 2, 16, 16), (2, 4, 16, 16), (1, 4, 8, 8), (1, 300, 16, 16)]),
        elements=st.floats(-1, 2, width=32) | st.sampled_from([np.nan, np.inf]),
    ).map(_npy),
    st.binary(max_size=200),
)


# ---------------------------------------------------------------------------------------------- routes
@HTTP
@given(
    file=garbage_files(),
    name=file_names,
    probs=prob_files,
    classes=class_specs,
    axis=st.none() | st.sampled_from(["0", "2", "3", "-1", "x", "99999999999999999999"]),
    return_probs=st.sampled_from([None, "true", "false", "maybe"]),
)
def test_pseudo_labels_never_5xx(http, file, name, probs, classes, axis, return_probs):
    files = {"file": (name, file)}
    if probs is not None:
        files["probs"] = ("p.npy", probs)
    data = {k: v for k, v in {"classes": classes, "axis": axis, "return_probs": return_probs}.items() if v is not None}
    r = http.post("/v1/pseudo-labels", files=files, data=data)
    _ok_or_4xx(r)
    if r.status_code == 200:
        meta, payload, fname = parse_multipart(r)
        assert meta["slices"] >= 1 and len(meta["confidence"]) == meta["slices"]
        if fname.endswith(".npy"):
            assert read_npy(payload).dtype == np.uint8


json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
coords = st.one_of(
    st.floats(-5, 40, allow_nan=False),
    st.sampled_from([float("nan"), float("inf"), 10**400, -(10**20), "3", None, [1]]),
)
prompts = st.one_of(
    st.fixed_dictionaries(
        {"class": st.sampled_from(["LV", "RV", 3, 0, -1, "²", "", "LV,RV", None, [3], 3.0, True])},
        optional={
            "points": st.lists(st.lists(coords, min_size=0, max_size=3), max_size=4) | json_junk,
            "point_labels": st.lists(st.sampled_from([0, 1, 2, -1, 0.5, "1"]), max_size=4),
            "box": st.lists(coords, min_size=0, max_size=5) | json_junk,
        },
    ).map(json.dumps),
    json_junk.map(json.dumps),
    st.text(max_size=40),
    st.just('{"class": "LV", "points": [[' + "9" * 5000 + ", 1]]}"),
)
masks = st.none() | st.one_of(
    hnp.arrays(
        st.sampled_from([np.float32, np.uint8, np.bool_, np.int16, np.float64]),
        st.sampled_from([(16, 16), (8, 8), (1, 16, 16)]),
    ).map(_npy),
    st.binary(max_size=100),
)


@HTTP
@given(image=st.one_of(small_images().map(_npy), garbage_files()), prompt=prompts, mask=masks)
def test_segment_never_5xx(http, image, prompt, mask):
    files = {"image": ("i.npy", image)}
    if mask is not None:
        files["mask"] = ("m.npy", mask)
    r = http.post("/v1/segment", files=files, data={"prompt": prompt})
    _ok_or_4xx(r)
    if r.status_code == 200:
        meta, payload, _ = parse_multipart(r)
        assert read_npy(payload).shape == tuple(meta["shape"]) and 0 <= meta["confidence"] <= 1


def test_segment_accepts_a_mask_prompt(http):
    """A valid (H, W) mask prompt is used, not refused (it was always a 400: 'need 2-256 classes')."""
    rng = np.random.default_rng(0)
    image = rng.random((32, 32), dtype=np.float32)
    mask = np.zeros((32, 32), np.float32)
    mask[8:24, 8:24] = 1.0
    for m in (mask, (mask * 255).astype(np.uint8), mask > 0.5):
        r = http.post(
            "/v1/segment",
            files={"image": ("i.npy", _npy(image)), "mask": ("m.npy", _npy(m))},
            data={"prompt": json.dumps({"class": "LV"})},
        )
        assert r.status_code == 200, r.text
    r = http.post(
        "/v1/segment",
        files={"image": ("i.npy", _npy(image)), "mask": ("m.npy", _npy(mask * 3))},
        data={"prompt": json.dumps({"class": "LV"})},
    )
    assert r.status_code == 400 and "[0, 1]" in r.json()["detail"]


@pytest.mark.parametrize(
    "prompt,needle",
    [
        ('{"class": ""}', "exactly one class"),
        ('{"class": "²"}', "unknown class"),
        ('{"class": "LV", "points": [[' + "9" * 400 + ", 1]]}", "numbers"),
        ('{"class": "LV", "points": [[' + "9" * 5000 + ", 1]]}", "JSON"),
    ],
)
def test_segment_prompts_that_used_to_be_500(http, prompt, needle):
    image = _npy(np.ones((16, 16), np.float32))
    r = http.post("/v1/segment", files={"image": ("i.npy", image)}, data={"prompt": prompt})
    assert r.status_code == 400 and needle in r.json()["detail"], r.text


template_tables = st.one_of(
    st.just('[{"index": 0, "name": "background"}, {"index": 1, "name": "RV"}, {"index": 2, "name": "Myo"}, {"index": 3, "name": "LV"}]'),
    json_junk.map(json.dumps),
    st.text(max_size=30),
    st.just('[{"index": ' + "9" * 5000 + ', "name": "x"}]'),
)


@HTTP
@given(
    image=garbage_files(),
    label=garbage_files(),
    table=template_tables,
    case_id=st.sampled_from(["fuzz", "../x", "a/b", "", "x" * 60, "ok_1", "a\nb", "%2e%2e"]) | st.text(max_size=10),
    patient_id=st.none() | st.sampled_from(["p1", "../p", "", "x" * 70]),
)
def test_add_template_never_5xx(http, image, label, table, case_id, patient_id):
    data = {"classes": table, "case_id": case_id}
    if patient_id is not None:
        data["patient_id"] = patient_id
    r = http.post("/v1/templates", files={"image": ("i.npy", image), "label": ("l.npy", label)}, data=data)
    _ok_or_4xx(r)
    if r.status_code == 200:  # an exemplar really was added: take it out again
        for eid in r.json()["added"]:
            assert http.delete(f"/v1/templates/{eid}").status_code == 200


@HTTP
@given(template_id=st.text(min_size=1, max_size=80) | st.sampled_from(["..", "...", "/", "%2e%2e%2fmanifest", "manifest.json", "a" * 65, "x\x00y"]))
def test_delete_template_never_5xx(http, serve_app, template_id):
    r = http.delete("/v1/templates/" + urllib.parse.quote(template_id, safe=""))
    assert r.status_code in (400, 404, 405), (template_id, r.status_code, r.text)
    assert (serve_app.bank / "manifest.json").is_file()


def test_get_routes_and_unknown_paths(http):
    for path in ("/v1/info", "/v1/templates", "/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert http.get(path).status_code == 200, path
    for method, path in [("GET", "/v1/nothing"), ("PUT", "/v1/templates"), ("GET", "/v1/pseudo-labels"), ("POST", "/healthz")]:
        r = http.request(method, path)
        assert 400 <= r.status_code < 500, (method, path, r.status_code)


# ---------------------------------------------------------------------------------------------- lying headers
def _raw(host: str, port: int, request: bytes, read_timeout: float = 20.0, shut: bool = False) -> bytes:
    """Send raw bytes and read the response until EOF, or until the status line and headers are in.
    shut: close our write side after sending (a client that hangs up)."""
    with socket.create_connection((host, port), timeout=read_timeout) as s:
        s.sendall(request)
        if shut:
            s.shutdown(socket.SHUT_WR)
        data = b""
        deadline = time.monotonic() + read_timeout
        while time.monotonic() < deadline and not (not shut and b"\r\n\r\n" in data):
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
        return data


def _status(resp: bytes) -> int | None:
    if not resp.startswith(b"HTTP/1."):
        return None
    return int(resp.split(b" ", 2)[1])


def _multipart(body_file: bytes) -> tuple[bytes, bytes]:
    boundary = b"fuzzboundary1234"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.npy"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + body_file + b"\r\n--" + boundary + b"--\r\n"
    )
    return body, b"multipart/form-data; boundary=" + boundary


def _head(host: str, port: int, length: str | int, ctype: bytes, extra: bytes = b"") -> bytes:
    return (
        f"POST /v1/pseudo-labels HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {length}\r\n".encode()
        + b"Content-Type: "
        + ctype
        + b"\r\n"
        + extra
        + b"Connection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    "case",
    ["shorter", "longer_then_close", "not_a_number", "negative", "huge", "te_and_cl", "two_lengths"],
)
def test_content_length_lies(serve_app, case):
    host, port = serve_app.url.removeprefix("http://").split(":")
    port = int(port)
    body, ctype = _multipart(_npy(np.zeros((16, 16), np.float32)))
    if case == "shorter":  # the server reads only what the header says: a cut multipart body
        req = _head(host, port, len(body) // 2, ctype) + body
    elif case == "longer_then_close":  # promises more than it sends, then hangs up
        req = _head(host, port, len(body) + 5000, ctype) + body
    elif case == "not_a_number":
        req = _head(host, port, "12abc", ctype) + body
    elif case == "negative":
        req = _head(host, port, -5, ctype) + body
    elif case == "huge":
        req = _head(host, port, 10**15, ctype) + body
    elif case == "te_and_cl":  # request smuggling shape: both headers
        req = _head(host, port, len(body), ctype, b"Transfer-Encoding: chunked\r\n") + body
    else:
        req = _head(host, port, len(body), ctype, f"Content-Length: {len(body) + 1}\r\n".encode()) + body
    resp = _raw(host, port, req, shut=case == "longer_then_close")
    status = _status(resp)
    if case == "longer_then_close":
        assert status is None or 400 <= status < 500, resp[:300]  # nothing (client left) or a 4xx
    else:
        assert status is not None and 400 <= status < 500, resp[:300]
    if case == "huge":
        assert status == 413
    # and the server is unharmed
    assert httpx.get(serve_app.url + "/healthz", timeout=10).status_code == 200


def test_body_over_the_limit_without_content_length_is_refused(serve_app):
    """A chunked upload (no Content-Length) whose file part grows past max_upload_mb (8 MiB in tests)
    is cut off with 413 while it streams in."""
    head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.npy"\r\n\r\n'
    chunk = b"\x00" * (1 << 20)

    def gen():
        yield head
        yield from (chunk for _ in range(12))
        yield b"\r\n--x--\r\n"

    r = httpx.post(
        serve_app.url + "/v1/pseudo-labels",
        content=gen(),
        headers={"content-type": "multipart/form-data; boundary=x"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 413, r.text


def test_slow_body_does_not_block_other_requests(serve_app):
    """A client that promises a body and never sends it holds one connection, not the server."""
    host, port = serve_app.url.removeprefix("http://").split(":")
    body, ctype = _multipart(_npy(np.zeros((16, 16), np.float32)))
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(_head(host, int(port), len(body) + 10_000, ctype) + body)
        t0 = time.monotonic()
        r = httpx.post(
            serve_app.url + "/v1/pseudo-labels", files={"file": ("a.npy", write_npy(np.ones((16, 16), np.float32)))}, timeout=TIMEOUT
        )
        assert r.status_code == 200 and time.monotonic() - t0 < TIMEOUT

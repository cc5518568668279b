"""Security of the running services: bearer-token auth on REST, Redis with a password, an ACL user and
TLS, request size limits, path traversal. Real processes (the session's Serve app, redis-server,
dispatcher subprocesses)."""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import json
import subprocess
import time
import zlib

import httpx
import numpy as np
import pytest
import redis

from services.runtime.redis_server import EmbeddedRedis, find_redis_server, free_port
from shared.wire.connection import RedisAuthError
from shared.wire.messages import result_stream
from shared.wire.stream_client import AsyncStreamClient
from tests.helpers import start_dispatcher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PASSWORD = "pw-" + "s3cret" * 4


def _npy(arr) -> bytes:
    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


# ---------------------------------------------------------------------------------------------- REST auth
ROUTES = [
    ("GET", "/v1/info"),
    ("GET", "/v1/templates"),
    ("POST", "/v1/templates"),
    ("DELETE", "/v1/templates/anything"),
    ("POST", "/v1/pseudo-labels"),
    ("POST", "/v1/segment"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
]


def test_every_route_but_health_needs_the_token(serve_app):
    token = serve_app.token
    # (trailing whitespace is not a variant: HTTP strips it from header values before anyone sees it)
    bad_headers = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Basic {token}"},
        {"Authorization": token},
        {"Authorization": f"Token {token}"},
        {"X-API-Key": token},
        {"Cookie": f"token={token}"},
    ]
    with httpx.Client(base_url=serve_app.auth_url, timeout=30) as c:
        for method, path in ROUTES:
            for h in bad_headers:
                r = c.request(method, path, headers=h)
                assert r.status_code == 401, (method, path, h, r.status_code)
                assert r.headers.get("www-authenticate") == "Bearer"
                assert token not in r.text
            r = c.request(method, path, params={"token": token, "access_token": token})
            assert r.status_code == 401, "a token in the query string is not accepted (it would end up in logs)"
        ok = {"Authorization": f"bearer {token}"}  # the scheme is case-insensitive (RFC 7235)
        assert c.get("/v1/info", headers=ok).status_code == 200
        assert token not in c.get("/v1/info", headers=ok).text
        assert token not in c.get("/openapi.json", headers=ok).text
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "path",
    ["/healthz/../v1/info", "/readyz/../metrics", "//v1/info", "/healthz/", "/HEALTHZ", "/v1/info?/healthz", "/%761/info", "/v1%2Finfo", "/readyz%2F..%2Fv1%2Finfo"],
)
def test_open_paths_cannot_be_used_to_bypass_the_token(serve_app, path):
    r = httpx.get(serve_app.auth_url + path, timeout=30)
    assert r.status_code in (401, 404), (path, r.status_code, r.text[:200])
    assert "bank_version" not in r.text and "vessa_http" not in r.text


def test_token_is_checked_before_the_body_is_read(serve_app):
    """Without the token a large upload is refused 401 at once (the size check never reads it)."""
    body = b"\x00" * (9 * 1024 * 1024)  # over the 8 MiB test limit
    r = httpx.post(
        serve_app.auth_url + "/v1/pseudo-labels",
        content=body,
        headers={"content-type": "application/octet-stream"},
        timeout=60,
    )
    assert r.status_code == 401


# ---------------------------------------------------------------------------------------------- size limits
def test_gzip_bomb_is_refused_with_4xx(serve_app):
    """A .nii.gz of ~300 KB that would inflate to 300 MB: refused (bounded decompression), not a 500/OOM."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    header = np.zeros(348, np.uint8).tobytes()
    chunk = b"\x00" * (1 << 20)
    bomb = comp.compress(header) + b"".join(comp.compress(chunk) for _ in range(300)) + comp.flush()
    assert len(bomb) < 1024 * 1024
    r = httpx.post(serve_app.url + "/v1/pseudo-labels", files={"file": ("bomb.nii.gz", bomb)}, timeout=120)
    assert r.status_code == 400 and "over the limit" in r.json()["detail"], r.text[:300]
    assert httpx.get(serve_app.url + "/healthz", timeout=10).status_code == 200


def test_npy_header_claiming_a_huge_array_is_refused_before_allocating(serve_app):
    hdr = b"{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000, 100000), }"
    hdr += b" " * (118 - len(hdr)) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(hdr).to_bytes(2, "little") + hdr + b"\x00" * 64
    r = httpx.post(serve_app.url + "/v1/pseudo-labels", files={"file": ("a.npy", data)}, timeout=60)
    assert r.status_code == 400 and "over the limit" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------- path traversal
@pytest.mark.parametrize("case_id", ["../evil", "..", "a/b", "a\\b", "x%2F..", "/etc", "a\nb", ".hidden"])
def test_template_case_ids_cannot_name_paths(serve_app, case_id):
    before = sorted(p.relative_to(serve_app.bank.parent) for p in serve_app.bank.parent.rglob("*"))
    img = _npy(np.random.default_rng(0).random((32, 32), dtype=np.float32))
    lab = np.zeros((32, 32), np.uint8)
    lab[8:20, 8:20] = 3
    r = httpx.post(
        serve_app.url + "/v1/templates",
        files={"image": ("../../../../tmp/evil.npy", img), "label": ("../evil_label.npy", _npy(lab))},
        data={
            "classes": json.dumps([{"index": i, "name": n} for i, n in enumerate(["background", "RV", "Myo", "LV"])]),
            "case_id": case_id,
        },
        timeout=60,
    )
    assert r.status_code == 400 and "case_id" in r.json()["detail"]
    after = sorted(p.relative_to(serve_app.bank.parent) for p in serve_app.bank.parent.rglob("*"))
    assert before == after


def test_upload_file_names_are_never_used_as_paths(serve_app, tmp_path):
    """File names are ignored (content decides the format); nothing is written where they point."""
    target = tmp_path / "evil.npy"
    for name in (str(target), "../" * 12 + str(target).lstrip("/"), "C:\\evil.npy", "a\x00b.npy"):
        r = httpx.post(
            serve_app.url + "/v1/pseudo-labels",
            files={"file": (name, _npy(np.ones((16, 16), np.float32)))},
            timeout=60,
        )
        assert r.status_code == 200, r.text[:200]
        assert 'filename="labels.npy"' in r.text
    assert not target.exists()


# ---------------------------------------------------------------------------------------------- Redis auth
def test_stream_client_fails_fast_and_clearly_without_the_password(tmp_path):
    server = EmbeddedRedis(tmp_path / "r", password=PASSWORD).start()
    try:
        for url in (server.url.replace(f":{PASSWORD}@", ""), server.url.replace(PASSWORD, "wrong-password")):

            async def attempt(u=url):
                c = AsyncStreamClient(u, "trainer-auth")
                await c.start()

            t0 = time.monotonic()
            with pytest.raises(RedisAuthError) as err:
                asyncio.run(asyncio.wait_for(attempt(), 30))
            assert time.monotonic() - t0 < 5, "a refused password is not retried like an outage"
            assert "refused our credentials" in str(err.value) and "wrong-password" not in str(err.value)
    finally:
        server.stop()


def test_dispatcher_exits_clearly_with_a_wrong_password(serve_app, tmp_path):
    server = EmbeddedRedis(tmp_path / "r", password=PASSWORD).start()
    try:
        log = tmp_path / "d.log"
        proc = start_dispatcher(server.url.replace(PASSWORD, "wrong-password"), serve_app.gcs_address, log)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the dispatcher kept retrying a refused password")
        text = log.read_text()
        # One `error: …` line (the CLI's rule; a traceback only with --debug), password masked.
        assert rc != 0 and "error: " in text and "refused our credentials" in text
        assert "Traceback" not in text and "wrong-password" not in text
    finally:
        server.stop()


def _tls_material(tmp_path):
    """A throwaway CA and a server certificate for 127.0.0.1."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject, issuer, key, signer, ca: bool):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("vessa-test-ca", "vessa-test-ca", ca_key, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    srv = cert("127.0.0.1", "vessa-test-ca", key, ca_key, False)
    paths = {n: tmp_path / f"{n}.pem" for n in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


ACL_RULES = (
    "on >{pw} resetkeys ~vessa:* resetchannels -@all +@stream +@list +@string +@keyspace +@scripting "
    "+@transaction +@connection -@dangerous"
)


def test_tls_acl_user_and_password_end_to_end(serve_app, tmp_path):
    """rediss:// with a CA, an ACL user limited to vessa:* keys and no dangerous commands, a password:
    the dispatcher and a trainer client work through it; plain redis:// and the default user do not."""
    pem = _tls_material(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [
            find_redis_server(),
            "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(pem["cert"]), "--tls-key-file", str(pem["key"]),
            "--tls-ca-cert-file", str(pem["ca"]), "--tls-auth-clients", "no",
            "--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
            "--maxmemory-policy", "noeviction",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    admin_url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={pem['ca']}"
    url = f"rediss://vessa:{PASSWORD}x@127.0.0.1:{port}/0?ssl_ca_certs={pem['ca']}"
    disp = None
    try:
        admin = redis.Redis.from_url(admin_url, socket_timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                admin.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "TLS redis-server did not come up"
                time.sleep(0.1)
        admin.execute_command("ACL", "SETUSER", "vessa", *ACL_RULES.format(pw=PASSWORD + "x").split())
        user = redis.Redis.from_url(url, socket_timeout=5)
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.flushall()
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.set("not-vessa:key", b"1")
        with pytest.raises(redis.ConnectionError):  # no plaintext on the TLS port
            redis.Redis.from_url(f"redis://vessa:{PASSWORD}x@127.0.0.1:{port}/0", socket_timeout=3).ping()

        disp = start_dispatcher(url, serve_app.gcs_address, tmp_path / "d.log")
        images = np.random.default_rng(0).integers(0, 255, (3, 1, 64, 64), dtype=np.uint8)

        async def run():
            c = AsyncStreamClient(url, "trainer-tls", max_in_flight=4)
            await c.start()
            ids = [await c.submit(img, class_ids=[3]) for img in images]
            out = [await c.result(i, 180) for i in ids]
            await c.close()
            return ids, out

        ids, out = asyncio.run(run())
        assert all(o is not None and o.status == "ok" for o in out), [o and o.error for o in out]
        assert admin.xlen(result_stream("trainer-tls")) == len(ids)
        assert disp.poll() is None
    finally:
        if disp is not None:
            disp.terminate()
            disp.wait(30)
        proc.terminate()
        proc.wait(10)


def test_unknown_paths_do_not_grow_the_metrics(serve_app):
    """Each distinct path must not become its own Prometheus label (unbounded memory on the ingress)."""
    paths = [f"/v1/nope-{i:04d}" for i in range(40)] + [f"/healthz-{i}" for i in range(10)]
    with httpx.Client(base_url=serve_app.url, timeout=30) as c:
        for p in paths:
            assert c.get(p).status_code == 404
        text = c.get("/metrics").text
    assert not [p for p in paths if p in text]
    assert 'route="other",status="404"' in text

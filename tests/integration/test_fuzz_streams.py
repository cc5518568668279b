"""Hostile entries on the Redis request stream, through a real dispatcher and the session's Serve app.

Whatever a producer XADDs, the dispatcher answers it with an `error` result (the call was readable but
its data was not usable) or a `dead` one (the entry itself was malformed, parked on the dead-letter
stream), each once and with a reason, and keeps serving the good requests around it. (The property
tests of the decoders themselves are in tests/unit/shared/test_fuzz_decoders.py; the malformed-JSON and truncated-
payload cases in tests/integration/test_streams.py.)
"""

from __future__ import annotations

import json
import time
import zlib

import numpy as np
import pytest
import redis

from shared.wire.messages import (
    DEAD_LETTER_STREAM,
    REQUEST_STREAM,
    RequestEnvelope,
    new_request_id,
    parse_result,
    request_fields,
    result_stream,
)
from shared.wire.protocol import encode_call
from tests.helpers import start_dispatcher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TRAINER = "trainer-hostile"


def _entry(call: dict, blobs: list[bytes], **envelope) -> tuple[str, dict]:
    rid = new_request_id()
    env = {
        "request_id": rid,
        "trainer_id": TRAINER,
        "reply_stream": result_stream(TRAINER),
        "call": call,
        "n_blobs": len(blobs),
        **envelope,
    }
    fields = {"meta": json.dumps(env).encode()}
    fields.update({f"b{i}": b for i, b in enumerate(blobs)})
    return rid, fields


def _good(image: np.ndarray) -> tuple[str, dict]:
    call, blobs = encode_call([image], class_ids=[3])
    env = RequestEnvelope(
        request_id=new_request_id(), trainer_id=TRAINER, reply_stream=result_stream(TRAINER), call=call, n_blobs=len(blobs)
    )
    return env.request_id, request_fields(env, blobs)


def _spec(dtype="float32", shape=(32, 32), blob=0, codec="raw") -> dict:
    return {"dtype": dtype, "shape": list(shape), "blob": blob, "codec": codec}


def hostile_entries() -> dict[str, tuple[str, dict, str]]:
    """name → (request id, fields, expected status)."""
    img = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    raw = img.tobytes()
    one = {"slices": [{"image": _spec()}], "class_ids": [3]}
    out = {
        # the dispatcher LRANGEs and DELs blob_key: naming the request stream itself would have deleted it
        "blob_key names the queue": (*_entry(one, [], blob_key="vessa:requests"), "dead"),
        "blob_key names a done marker": (*_entry(one, [], blob_key="vessa:done:" + "0" * 32), "dead"),
        "shape overflows int64": (*_entry({"slices": [{"image": _spec(shape=(1 << 24,) * 4)}]}, [b"\x00" * 16]), "error"),
        "shape bigger than blob": (*_entry({"slices": [{"image": _spec(shape=(64, 64))}]}, [raw]), "error"),
        "NaN image": (*_entry({"slices": [{"image": _spec()}]}, [np.full((32, 32), np.nan, np.float32).tobytes()]), "error"),
        "1-D image": (*_entry({"slices": [{"image": _spec(shape=(1024,))}]}, [raw]), "error"),
        "object dtype": (*_entry({"slices": [{"image": _spec(dtype="object")}]}, [raw]), "dead"),
        "zlib garbage": (*_entry({"slices": [{"image": _spec(codec="zlib")}]}, [b"\x78\x9c" + b"junk" * 10]), "error"),
        "zlib bomb": (
            *_entry({"slices": [{"image": _spec()}]}, [zlib.compress(b"\x00" * (64 << 20), 9)]),
            "error",
        ),
        "unknown class": (*_entry({"slices": [{"image": _spec()}], "class_ids": [99]}, [raw]), "error"),
        "probs with wrong class count": (
            *_entry(
                {"slices": [{"image": _spec(), "probs": _spec(shape=(7, 32, 32), blob=1)}]},
                [raw, np.full((7, 32, 32), 1 / 7, np.float32).tobytes()],
            ),
            "error",
        ),
        "probs out of range": (
            *_entry(
                {"slices": [{"image": _spec(), "probs": _spec(shape=(4, 32, 32), blob=1)}]},
                [raw, np.full((4, 32, 32), 5.0, np.float32).tobytes()],
            ),
            "error",
        ),
        "blob index past the parts": (*_entry({"slices": [{"image": _spec(blob=7)}]}, [raw]), "error"),
        "announced parts missing": (*_entry(one, [raw], n_blobs=3), "dead"),
        "neither image nor hash": (*_entry({"slices": [{}]}, []), "error"),
        "future schema": (*_entry(one, [raw], schema_version=99), "dead"),
        "pinned bank version gone": (*_entry({**one, "bank_version": 123456}, [raw]), "error"),
        "too many slices": (*_entry({"slices": [{"hash": "0" * 32}] * 2000}, []), "error"),
    }
    return out


def test_hostile_stream_entries_get_one_error_result_each(serve_app, redis_server, tmp_path):
    r = redis.Redis.from_url(redis_server.url)
    disp = start_dispatcher(
        redis_server.url, serve_app.gcs_address, tmp_path / "d.log", claim_idle_ms=3000, claim_interval_s=1.0
    )
    try:
        img = np.random.default_rng(1).random((32, 32), dtype=np.float32)
        before = [_good(img)]
        cases = hostile_entries()
        after = [_good(img * 0.5)]
        for _rid, fields in before:
            r.xadd(REQUEST_STREAM, fields)
        for _rid, fields, _ in cases.values():
            r.xadd(REQUEST_STREAM, fields)
        for _rid, fields in after:
            r.xadd(REQUEST_STREAM, fields)
        want = len(before) + len(cases) + len(after)
        deadline = time.monotonic() + 180
        while r.xlen(result_stream(TRAINER)) < want:
            assert time.monotonic() < deadline, f"{r.xlen(result_stream(TRAINER))} of {want} answered"
            assert disp.poll() is None, "the dispatcher died"
            time.sleep(0.2)
        time.sleep(2)  # nothing more may arrive: each request is answered once
        results = [parse_result(f)[0] for _, f in r.xrange(result_stream(TRAINER))]
        by_id = {x.request_id: x for x in results}
        assert len(results) == len(by_id) == want, "each request answered exactly once"
        for rid, _ in before + after:
            assert by_id[rid].status == "ok", by_id[rid].error
        problems = []
        for name, (rid, _, status) in cases.items():
            res = by_id[rid]
            if res.status != status or not (res.error or "").strip():
                problems.append(f"{name}: {res.status} {res.error!r} (expected {status})")
        assert not problems, "\n".join(problems)
        assert r.type(REQUEST_STREAM) == b"stream" and r.xinfo_groups(REQUEST_STREAM)
        dead = r.xrange(DEAD_LETTER_STREAM)
        assert len(dead) == sum(s == "dead" for *_, s in cases.values())
        assert disp.poll() is None
        assert "Task exception was never retrieved" not in (tmp_path / "d.log").read_text()
    finally:
        disp.terminate()
        disp.wait(30)

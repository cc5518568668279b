"""Property-based tests (hypothesis) of every decoder of wire data.

Each decoder either returns a value that satisfies its contract or raises its own error type
(WireError / VolumeError / ValueError) with a message; never another exception type, never a hang.
Pure functions, no processes: the whole file runs in seconds.
"""

from __future__ import annotations

import gzip
import io
import json
import struct

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from services.ingress.uploads import UploadedVolume, VolumeError, read_upload
from shared.data.nifti import nifti_from_bytes
from shared.wire.arrays import (
    ALLOWED_DTYPES,
    ArraySpec,
    WireError,
    decode_array,
    encode_array,
    read_npy,
    write_npy,
)
from shared.wire.messages import (
    RequestEnvelope,
    ResultEnvelope,
    new_request_id,
    parse_request,
    parse_result,
    request_fields,
    result_fields,
    result_stream,
)
from shared.wire.protocol import AssistCall, Limits, decode_slices, encode_call, parse_call, probabilities

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = Limits(max_slices=16, max_side=64, min_side=8, max_array_bytes=1 << 20)


def _message(exc: BaseException) -> None:
    assert str(exc).strip(), f"{type(exc).__name__} without a message"


# ---------------------------------------------------------------------------------------------- strategies
any_dtype = st.sampled_from(ALLOWED_DTYPES) | st.sampled_from(["object", "complex64", "<U4", "float128", "", "V8"])
dims = st.integers(-3, 40) | st.sampled_from([0, 1 << 24, (1 << 24) + 1, 1 << 31, 1 << 63])
shapes = st.lists(dims, max_size=6).map(tuple)
blobs_st = st.lists(st.binary(max_size=512), max_size=4)


def native_or_swapped(dtype_name: str) -> st.SearchStrategy[np.dtype]:
    dt = np.dtype(dtype_name)
    return st.sampled_from([dt, dt.newbyteorder(">"), dt.newbyteorder("<")])


small_arrays = st.sampled_from(ALLOWED_DTYPES).flatmap(native_or_swapped).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
)


def spec_dicts() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"dtype": any_dtype, "shape": shapes, "blob": st.integers(-1, 5)},
        optional={"codec": st.sampled_from(["raw", "zlib", "gzip"])},
    )


# ---------------------------------------------------------------------------------------------- shared.wire.arrays
@FUZZ
@given(spec=spec_dicts(), blobs=blobs_st, max_bytes=st.sampled_from([0, 64, 1 << 20]))
@example(spec={"dtype": "float64", "shape": (1 << 24,) * 4, "blob": 0}, blobs=[b""], max_bytes=1 << 20)
@example(spec={"dtype": "float64", "shape": (1 << 24, 1 << 24, 1 << 16), "blob": 0}, blobs=[b""], max_bytes=1 << 20)
@example(spec={"dtype": "uint8", "shape": (4, 4), "codec": "zlib", "blob": 0}, blobs=[b"\x78\x9c" + b"\x00" * 8], max_bytes=64)
def test_decode_array_returns_the_promised_array_or_wire_error(spec, blobs, max_bytes):
    try:
        parsed = ArraySpec.model_validate(spec)
    except ValueError as exc:  # pydantic's ValidationError: how a bad spec fails inside parse_call
        _message(exc)
        return
    try:
        arr = decode_array(parsed, blobs, max_bytes)
    except WireError as exc:
        _message(exc)
        return
    assert arr.shape == parsed.shape and arr.dtype == np.dtype(parsed.dtype)
    assert arr.nbytes == parsed.nbytes() <= max_bytes


@FUZZ
@given(arr=small_arrays, compress=st.sampled_from([None, True, False]))
def test_encode_decode_round_trip_any_byte_order(arr, compress):
    blobs: list[bytes] = []
    spec = encode_array(arr, blobs, compress)
    back = decode_array(ArraySpec.model_validate_json(spec.model_dump_json()), blobs)
    assert back.shape == arr.shape and back.dtype == arr.dtype.newbyteorder("=")
    assert np.array_equal(back, arr, equal_nan=arr.dtype.kind == "f")


@FUZZ
@given(arr=small_arrays.filter(lambda a: a.nbytes > 0), cut=st.integers(1, 64), extra=st.binary(min_size=1, max_size=8))
def test_decode_array_rejects_blobs_that_lie_about_their_size(arr, cut, extra):
    for compress in (False, True):
        blobs: list[bytes] = []
        spec = encode_array(arr, blobs, compress)
        for bad in (blobs[0][: max(0, len(blobs[0]) - cut)], blobs[0] + extra):
            if spec.codec == "zlib" and bad.startswith(blobs[0]):
                continue  # trailing bytes after a complete zlib stream are ignored; the data is intact
            with pytest.raises(WireError) as err:
                decode_array(spec, [bad])
            _message(err.value)


def _npy_header(descr: str, shape: str, fortran: str = "False", version: int = 1) -> bytes:
    h = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}".encode()
    pre = 10 if version == 1 else 12
    h += b" " * ((64 - (pre + len(h) + 1) % 64) % 64) + b"\n"
    size = struct.pack("<H", len(h)) if version == 1 else struct.pack("<I", len(h))
    return b"\x93NUMPY" + bytes([version, 0]) + size + h


npy_descr = st.sampled_from(
    ["'<f4'", "'>f4'", "'|u1'", "'<i8'", "'|b1'", "'|O'", "'<U3'", "'<c8'", "[('a', '<f4')]", "('<f4', (2,))", "'<f2'", "'bogus'", "5"]
)
npy_shape = st.lists(dims, max_size=5).map(lambda s: repr(tuple(s))) | st.sampled_from(["(2, 'x')", "[2, 2]", "None", "(-1,)"])


@FUZZ
@given(
    descr=npy_descr,
    shape=npy_shape,
    fortran=st.sampled_from(["False", "True", "1"]),
    version=st.sampled_from([1, 2]),
    body=st.binary(max_size=256),
)
def test_read_npy_headers_that_lie(descr, shape, fortran, version, body):
    data = _npy_header(descr, shape, fortran, version) + body
    try:
        arr = read_npy(data, 1 << 20)
    except WireError as exc:
        _message(exc)
        return
    assert arr.dtype.name in ALLOWED_DTYPES and arr.dtype.isnative and arr.ndim <= 4


@FUZZ
@given(data=st.binary(max_size=600) | st.binary(max_size=200).map(lambda b: b"\x93NUMPY" + b))
def test_read_npy_random_bytes(data):
    try:
        read_npy(data, 1 << 20)
    except WireError as exc:
        _message(exc)


@FUZZ
@given(arr=small_arrays, cut=st.integers(1, 200))
def test_read_npy_round_trip_and_truncation(arr, cut):
    data = write_npy(arr)
    back = read_npy(data)
    assert back.shape == arr.shape and np.array_equal(back, arr, equal_nan=arr.dtype.kind == "f")
    assert back.dtype.isnative
    truncated = data[: max(0, len(data) - cut)]
    if arr.nbytes == 0 and len(truncated) >= len(data) - 1:
        return  # np.save pads the header; an empty array may lose padding only
    with pytest.raises(WireError) as err:
        read_npy(truncated)
    _message(err.value)


def test_read_npy_never_unpickles():
    bio = io.BytesIO()
    np.save(bio, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(WireError, match="not allowed"):
        read_npy(bio.getvalue())


# ---------------------------------------------------------------------------------------------- shared.wire.protocol
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    meta=json_values.map(json.dumps)
    | st.binary(max_size=200)
    | st.text(max_size=200)
    | json_values.filter(lambda v: isinstance(v, dict))
)
def test_parse_call_random_json_and_bytes(meta):
    try:
        call = parse_call(meta)
    except WireError as exc:
        _message(exc)
        return
    assert isinstance(call, AssistCall) and call.slices


def _slice_dicts() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {},
        optional={
            "hash": st.sampled_from(["0" * 32, "f" * 32, "xyz", "A" * 32, "0" * 31]),
            "image": spec_dicts(),
            "probs": spec_dicts(),
        },
    )


@FUZZ
@given(
    slices=st.lists(_slice_dicts(), min_size=0, max_size=4),
    class_ids=st.none() | st.lists(st.integers(-5, 300), max_size=4),
    schema=st.sampled_from([1, 1, 2, -1]),
    blobs=blobs_st,
)
def test_parse_and_decode_slices_of_arbitrary_calls(slices, class_ids, schema, blobs):
    meta = {"schema_version": schema, "slices": slices, "class_ids": class_ids}
    try:
        call = parse_call(meta)
        out = decode_slices(call, blobs, LIMITS)
    except WireError as exc:
        _message(exc)
        return
    for s in out:
        assert s.image is not None or s.hash is not None
        if s.image is not None:
            assert s.image.ndim == 2 and min(s.image.shape) >= LIMITS.min_side
        if s.probs is not None:
            assert s.probs.dtype == np.float32 and s.probs.min() >= 0 and s.probs.max() <= 1


image_arrays = st.sampled_from(["uint8", "int16", "float16", "float32", "float64", "bool", "int64"]).flatmap(
    lambda dt: hnp.arrays(
        np.dtype(dt),
        st.sampled_from([(16, 16), (8, 9), (0, 16), (4, 16), (1, 16, 16), (16,), (65, 8)]),
        elements=hnp.from_dtype(np.dtype(dt), allow_nan=True, allow_infinity=True) if dt.startswith("float") else None,
    )
)
prob_arrays = st.sampled_from(["uint8", "float16", "float32", "float64", "int32", "bool"]).flatmap(
    lambda dt: hnp.arrays(
        np.dtype(dt),
        st.sampled_from([(4, 16, 16), (2, 8, 8), (1, 16, 16), (300, 8, 8), (4, 16), (4, 7, 16)]),
        elements=hnp.from_dtype(np.dtype(dt), min_value=-2, max_value=3) | st.sampled_from([np.nan, np.inf, -np.inf])
        if dt.startswith("float")
        else None,
    )
)


@FUZZ
@given(image=image_arrays, probs=st.none() | prob_arrays, with_hash=st.booleans())
def test_decode_slices_of_encoded_arrays(image, probs, with_hash):
    """Well-formed encodings of arbitrary arrays: bad shapes/dtypes/NaN are rejected by name."""
    call, blobs = encode_call([image], ["0" * 32] if with_hash else None, [probs] if probs is not None else None)
    try:
        (s,) = decode_slices(parse_call(call.model_dump_json()), blobs, LIMITS)
    except WireError as exc:
        _message(exc)
        return
    assert s.image.ndim == 2 and image.dtype != np.bool_ and np.isfinite(s.image.astype(np.float64)).all()
    if probs is not None:
        assert s.probs.shape == probs.shape and 0 <= s.probs.min() and s.probs.max() <= 1


@FUZZ
@given(raw=prob_arrays)
def test_probabilities_are_float32_in_unit_interval_or_rejected(raw):
    try:
        p = probabilities(raw, "p", LIMITS)
    except WireError as exc:
        _message(exc)
        return
    assert p.dtype == np.float32 and p.shape == raw.shape
    assert np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1


# ---------------------------------------------------------------------------------------------- stream messages
def _valid_request_fields(image: np.ndarray) -> dict[bytes, bytes]:
    call, blobs = encode_call([image])
    env = RequestEnvelope(
        request_id=new_request_id(), trainer_id="t-1", reply_stream=result_stream("t-1"), call=call, n_blobs=len(blobs)
    )
    return {k.encode(): v for k, v in request_fields(env, blobs).items()}


envelope_mutations = st.fixed_dictionaries(
    {},
    optional={
        "request_id": st.sampled_from(["", "x" * 32, "0" * 32, "0" * 33, 5]),
        "trainer_id": st.sampled_from(["", "t\n", "a" * 65, "../x", "t-1", "ü"]),
        "reply_stream": st.sampled_from(["vessa:results:t-1", "vessa:requests", "vessa:results:", "x", "vessa:results:t\n"]),
        "n_blobs": st.integers(-2, 100_002),
        "blob_key": st.sampled_from([None, "vessa:requests", "vessa:blob:" + "0" * 32, "vessa:done:x", ""]),
        "schema_version": st.integers(-1, 3),
        "call": json_values,
        "extra": json_values,
    },
)


@FUZZ
@given(mutation=envelope_mutations, drop=st.lists(st.integers(0, 3), max_size=2), junk=st.binary(max_size=64))
def test_parse_request_mutated_envelopes(mutation, drop, junk):
    fields = _valid_request_fields(np.zeros((8, 8), np.uint8))
    meta = json.loads(fields[b"meta"])
    meta.update(mutation)
    fields[b"meta"] = json.dumps(meta).encode()
    for i in drop:
        fields.pop(f"b{i}".encode(), None)
    if junk:
        fields[b"b7"] = junk
    try:
        env, blobs = parse_request(fields)
    except WireError as exc:
        _message(exc)
        return
    assert env.reply_stream == f"vessa:results:{env.reply_stream.split(':', 2)[2]}"
    assert env.blob_key is None or env.blob_key.startswith("vessa:blob:")
    assert blobs is None or len(blobs) == env.n_blobs


@FUZZ
@given(fields=st.dictionaries(st.sampled_from([b"meta", b"b0", b"b1", b"x"]), st.binary(max_size=200), max_size=4))
def test_parse_request_and_result_random_fields(fields):
    for parse in (parse_request, parse_result):
        try:
            parse(fields)
        except WireError as exc:
            _message(exc)


@FUZZ
@given(
    status=st.sampled_from(["ok", "error", "dead", "weird", ""]),
    reply=st.none() | json_values,
    blobs=st.lists(st.binary(max_size=16), max_size=3),
)
def test_parse_result_mutated(status, reply, blobs):
    env = ResultEnvelope(request_id=new_request_id(), status="ok")
    meta = json.loads(env.model_dump_json())
    meta.update({"status": status, "reply": reply})
    fields = {k.encode(): v for k, v in result_fields(env, blobs).items()}
    fields[b"meta"] = json.dumps(meta).encode()
    try:
        out, got = parse_result(fields)
    except WireError as exc:
        _message(exc)
        return
    assert out.status in ("ok", "error", "dead") and got == blobs


def test_request_blob_key_cannot_name_other_keys():
    """The dispatcher LRANGEs and DELetes `blob_key`: only the request's own payload key is accepted."""
    fields = _valid_request_fields(np.zeros((8, 8), np.uint8))
    for key in ("vessa:requests", "vessa:done:" + "0" * 32, "vessa:blob:" + "0" * 32 + "\n", "*"):
        meta = json.loads(fields[b"meta"])
        meta["blob_key"] = key
        with pytest.raises(WireError, match="blob_key"):
            parse_request({b"meta": json.dumps(meta).encode()})


# ---------------------------------------------------------------------------------------------- NIfTI / uploads
def _nifti(arr: np.ndarray, two: bool = False) -> bytes:
    klass = nib.Nifti2Image if two else nib.Nifti1Image
    return klass(arr, np.eye(4)).to_bytes()


BASE_N1 = _nifti(np.arange(16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3))
BASE_N2 = _nifti(np.arange(16 * 16 * 3, dtype=np.int16).reshape(16, 16, 3), two=True)

# (offset, struct format) of NIfTI-1 / NIfTI-2 header fields worth lying about
N1_FIELDS = {
    "sizeof_hdr": (0, "<i"),
    "dim": (40, "<8h"),
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"),
    "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"),
    "magic": (344, "4s"),
}
N2_FIELDS = {"dim": (16, "<8q"), "datatype": (12, "<h"), "vox_offset": (168, "<q"), "scl_slope": (176, "<d")}

int16s = st.integers(-(1 << 15), (1 << 15) - 1)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)


def n1_mutation() -> st.SearchStrategy[tuple[str, tuple]]:
    return st.one_of(
        st.tuples(st.just("dim"), st.tuples(st.integers(-1, 8), *[st.sampled_from([-1, 0, 1, 3, 16, 17, 2048, 32767])] * 7)),
        st.tuples(st.just("datatype"), st.tuples(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1536, 2304, 32767]))),
        st.tuples(st.just("bitpix"), st.tuples(int16s)),
        st.tuples(st.just("pixdim"), st.tuples(*[floats32] * 8)),
        st.tuples(st.just("vox_offset"), st.tuples(st.sampled_from([0.0, 348.0, 352.0, 353.0, 4096.0, 1e9, -1.0, float("nan"), float("inf")]))),
        st.tuples(st.just("scl_slope"), st.tuples(floats32)),
        st.tuples(st.just("scl_inter"), st.tuples(floats32)),
        st.tuples(st.just("sizeof_hdr"), st.tuples(st.sampled_from([0, 348, 540, -348, 1 << 30]))),
        st.tuples(st.just("magic"), st.tuples(st.sampled_from([b"n+1\x00", b"ni1\x00", b"n+2\x00", b"abcd"]))),
    )


def n2_mutation() -> st.SearchStrategy[tuple[str, tuple]]:
    big = st.sampled_from([-1, 0, 1, 3, 16, 1 << 20, 1 << 32, (1 << 63) - 1])
    return st.one_of(
        st.tuples(st.just("dim"), st.tuples(st.integers(-1, 8), *[big] * 7)),
        st.tuples(st.just("datatype"), st.tuples(st.sampled_from([0, 2, 4, 16, 64, 128, 32767]))),
        st.tuples(st.just("vox_offset"), st.tuples(st.sampled_from([0, 540, 544, 1 << 40, -8]))),
        st.tuples(st.just("scl_slope"), st.tuples(st.floats(allow_nan=True, allow_infinity=True))),
    )


def _mutate(base: bytes, fields: dict, mutations: list[tuple[str, tuple]]) -> bytes:
    data = bytearray(base)
    for name, values in mutations:
        offset, fmt = fields[name]
        struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


nifti_bytes_st = st.one_of(
    st.lists(n1_mutation(), min_size=1, max_size=3).map(lambda m: _mutate(BASE_N1, N1_FIELDS, m)),
    st.lists(n2_mutation(), min_size=1, max_size=3).map(lambda m: _mutate(BASE_N2, N2_FIELDS, m)),
)


def _variants(data: bytes, cut: int, gz: bool) -> bytes:
    if cut:
        data = data[: max(0, len(data) - cut)]
    return gzip.compress(data, compresslevel=1) if gz else data


@FUZZ
@given(data=nifti_bytes_st, cut=st.sampled_from([0, 0, 1, 100, 700, 4000]), gz=st.booleans(), label=st.booleans())
def test_read_upload_lying_nifti_headers(data, cut, gz, label):
    payload = _variants(data, cut, gz)
    try:
        up = read_upload(payload, "x.nii.gz" if gz else "x.nii", None, LIMITS, is_label=label)
    except VolumeError as exc:
        _message(exc)
        return
    _check_upload(up, label)


def _check_upload(up: UploadedVolume, label: bool) -> None:
    d, h, w = up.slices.shape
    assert 1 <= d <= LIMITS.max_slices and LIMITS.min_side <= min(h, w) and max(h, w) <= LIMITS.max_side
    assert up.slices.dtype == (np.int64 if label else np.float32)
    assert np.isfinite(up.slices.astype(np.float64)).all()


@FUZZ
@given(
    data=st.binary(max_size=800)
    | st.binary(max_size=800).map(lambda b: b"\x1f\x8b" + b)
    | st.binary(max_size=600).map(lambda b: struct.pack("<i", 348) + b)
    | st.binary(max_size=200).map(lambda b: b"\x93NUMPY" + b),
    name=st.sampled_from(["", "a.nii", "a.npy", "../../etc/passwd", "a.nii.gz\x00.npy"]),
    axis=st.none() | st.integers(-3, 5),
)
def test_read_upload_random_bytes(data, name, axis):
    try:
        read_upload(data, name, axis, LIMITS)
    except VolumeError as exc:
        _message(exc)


upload_arrays = st.sampled_from(["uint8", "int16", "float32", "float64", "bool", "int64", "float16"]).flatmap(
    native_or_swapped
).flatmap(
    lambda dt: hnp.arrays(
        dt,
        st.sampled_from([(16, 16), (2, 16, 16), (0, 16, 16), (16, 4), (1, 8, 8, 1), (3, 8, 8, 2), (17, 8, 8), (16,)]),
        elements=hnp.from_dtype(dt, allow_nan=True, allow_infinity=True) if dt.kind == "f" else None,
    )
)


@FEW
@given(arr=upload_arrays, as_npy=st.booleans(), label=st.booleans(), allow_4d=st.booleans(), axis=st.none() | st.integers(-1, 3))
def test_read_upload_of_arbitrary_arrays(arr, as_npy, label, allow_4d, axis):
    if as_npy:
        payload = write_npy(arr)
    else:
        assume(arr.ndim >= 2 and arr.dtype.kind != "b" and arr.dtype.name != "float16")
        native = arr.astype(arr.dtype.newbyteorder("="))
        payload = nib.Nifti1Image(native, np.eye(4), dtype=native.dtype).to_bytes()
    try:
        up = read_upload(payload, "a.npy" if as_npy else "a.nii", axis, LIMITS, is_label=label, allow_4d=allow_4d)
    except VolumeError as exc:
        _message(exc)
        return
    _check_upload(up, label)
    if label:
        assert up.slices.min() >= 0 and up.slices.max() <= 255


@FUZZ
@given(data=nifti_bytes_st, cut=st.sampled_from([0, 0, 1, 100, 700]), gz=st.booleans())
def test_nifti_from_bytes_lying_headers(data, cut, gz):
    try:
        img = nifti_from_bytes(_variants(data, cut, gz), "fuzz.nii")
    except ValueError as exc:
        _message(exc)
        return
    assert isinstance(img, nib.Nifti1Image | nib.Nifti2Image)
    assert 2 <= len(img.shape) <= 4


@FUZZ
@given(data=st.binary(max_size=800) | st.binary(max_size=800).map(lambda b: b"\x1f\x8b" + b))
def test_nifti_from_bytes_random_bytes(data):
    try:
        nifti_from_bytes(data)
    except ValueError as exc:
        _message(exc)


def test_nifti_from_bytes_rejects_nifti2_dims_that_overflow_int64():
    data = _mutate(BASE_N2, N2_FIELDS, [("dim", (3, 1 << 32, 1 << 32, 1 << 32, 1, 1, 1, 1))])
    with pytest.raises(ValueError, match="truncated|dimension"):
        nifti_from_bytes(data)

"""Redis stream entries of the trainer ⇄ dispatcher path (see docs/protocol.md).

Request entry on `vessa:requests` (fields):
    meta    JSON `RequestEnvelope` (request id, trainer id, reply stream, the AssistCall, schema version)
    b0..bN  the call's binary parts, unless `meta.blob_key` names a Redis list holding them (large
            payloads; the key expires after `blob_ttl_s`)
Result entry on the trainer's own stream `vessa:results:<trainer id>`:
    meta    JSON `ResultEnvelope` (request id, status, error, the AssistReply, attempts, timing)
    b0..bN  the reply's binary parts (label maps, probabilities)
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.wire.arrays import WireError
from shared.wire.protocol import SCHEMA_VERSION, AssistCall, AssistReply

REQUEST_STREAM = "vessa:requests"
# Bulk work (labeling jobs) has a stream of its own: the dispatcher reads it only when the request
# stream has nothing waiting, and keeps at most `bulk_max_inflight` of its calls in flight, so a
# trainer's requests never queue behind a job's.
BULK_STREAM = "vessa:requests:bulk"
DEAD_LETTER_STREAM = "vessa:dead"
GROUP = "vessa-dispatchers"
_TRAINER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # used with fullmatch: "$" would accept a trailing newline
MAX_BLOBS = 100_000


def result_stream(trainer_id: str) -> str:
    return f"vessa:results:{trainer_id}"


def done_key(request_id: str) -> str:
    """The dispatcher's marker that `request_id` has its result (set atomically with the result)."""
    return f"vessa:done:{request_id}"


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    request_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    trainer_id: str
    reply_stream: str
    call: AssistCall
    n_blobs: int = Field(ge=0, le=MAX_BLOBS)
    # Only the request's own payload key: the dispatcher reads and deletes this key, so any other
    # name would let a request delete or read keys it does not own.
    blob_key: str | None = Field(default=None, pattern=r"^vessa:blob:[0-9a-f]{32}$")
    created: float = Field(default_factory=time.time)
    deadline_s: float | None = None  # the trainer stops waiting after this; later work is wasted

    @field_validator("trainer_id")
    @classmethod
    def _trainer(cls, v: str) -> str:
        if not _TRAINER_RE.fullmatch(v):
            raise ValueError("trainer id must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("reply_stream")
    @classmethod
    def _reply(cls, v: str) -> str:
        if not v.startswith("vessa:results:") or not _TRAINER_RE.fullmatch(v[len("vessa:results:") :]):
            raise ValueError("reply stream must be vessa:results:<trainer id>")
        return v


class ResultEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    request_id: str
    status: Literal["ok", "error", "dead"]
    error: str | None = None
    reply: AssistReply | None = None
    attempts: int = 1
    dispatcher: str = ""
    timing: dict[str, float] = Field(default_factory=dict)


def parse_request(fields: dict[bytes, bytes]) -> tuple[RequestEnvelope, list[bytes] | None]:
    """(envelope, inline binary parts or None when they live under blob_key); WireError if malformed."""
    meta = fields.get(b"meta")
    if meta is None:
        raise WireError("request entry has no 'meta' field")
    try:
        env = RequestEnvelope.model_validate_json(meta)
    except ValidationError as exc:
        raise WireError(
            f"malformed request envelope: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
        ) from None
    if env.schema_version != SCHEMA_VERSION:
        raise WireError(
            f"schema version {env.schema_version} not supported (dispatcher speaks {SCHEMA_VERSION})"
        )
    if env.blob_key is not None:
        return env, None
    blobs = []
    for i in range(env.n_blobs):
        part = fields.get(f"b{i}".encode())
        if part is None:
            raise WireError(
                f"request {env.request_id} announces {env.n_blobs} binary parts, part b{i} is missing"
            )
        blobs.append(part)
    return env, blobs


def request_fields(env: RequestEnvelope, blobs: list[bytes] | None) -> dict[str, bytes]:
    fields: dict[str, bytes] = {"meta": env.model_dump_json().encode()}
    for i, b in enumerate(blobs or []):
        fields[f"b{i}"] = b
    return fields


def result_fields(env: ResultEnvelope, blobs: list[bytes]) -> dict[str, bytes]:
    fields: dict[str, bytes] = {"meta": env.model_dump_json().encode()}
    for i, b in enumerate(blobs):
        fields[f"b{i}"] = b
    return fields


def parse_result(fields: dict[bytes, bytes]) -> tuple[ResultEnvelope, list[bytes]]:
    meta = fields.get(b"meta")
    if meta is None:
        raise WireError("result entry has no 'meta' field")
    try:
        env = ResultEnvelope.model_validate_json(meta)
    except ValidationError as exc:
        raise WireError(f"malformed result envelope: {exc.errors()[0]['msg']}") from None
    blobs = []
    i = 0
    while f"b{i}".encode() in fields:
        blobs.append(fields[f"b{i}".encode()])
        i += 1
    return env, blobs

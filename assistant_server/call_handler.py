"""Serving assistant calls: decode and validate, batch across calls, predict, encode the replies.

Pure logic around `Assistant.predict`, shared by the Serve replica (deployment.py), the in-process
benchmarks and tests. A bad call gets an error reply of its own; it never fails its batch neighbours.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np

from assistant_server.assistant import Assistant, AssistantInputError, BankVersionError, SliceInput
from shared.wire.arrays import WireError, encode_array
from shared.wire.protocol import (
    AssistCall,
    AssistReply,
    DecodedSlice,
    Limits,
    WireSliceResult,
    decode_slices,
    parse_call,
)

log = logging.getLogger("vessa.assistant")

Item = tuple[bytes | str | dict, list[bytes]]


def error_reply(
    message: str, kind: str, assistant: Assistant | None = None
) -> tuple[AssistReply, list[bytes]]:
    return (
        AssistReply(
            status="error",
            error=message,
            error_kind=kind,
            model_version=assistant.model_version if assistant else "",
            bank_version=assistant.bank.version if assistant else -1,
        ),
        [],
    )


def _validate(assistant: Assistant, call: AssistCall, slices: list[DecodedSlice]) -> None:
    """Checks that need the assistant (classes, bank version), done per call before batching."""
    assistant._check_class_ids(call.class_ids)
    c = len(assistant.classes)
    for i, s in enumerate(slices):
        if s.probs is not None and s.probs.shape[0] != c:
            raise AssistantInputError(
                f"slice {i}: student probabilities have {s.probs.shape[0]} classes, this assistant has {c}"
            )
    if call.bank_version is not None and call.bank_version != assistant.bank_state().version:
        raise BankVersionError(
            f"bank version {call.bank_version} does not exist any more: this assistant serves version "
            f"{assistant.bank_state().version}"
        )


def serve_calls(
    assistant: Assistant, items: list[Item], limits: Limits | None = None
) -> list[tuple[AssistReply, list[bytes]]]:
    """Answer a batch of calls; calls with the same options share one `predict`."""
    limits = limits or Limits()
    t_start = time.perf_counter()
    replies: list[tuple[AssistReply, list[bytes]] | None] = [None] * len(items)
    groups: dict[tuple, list[tuple[int, AssistCall, list[DecodedSlice]]]] = defaultdict(list)
    for i, (meta, blobs) in enumerate(items):
        try:
            call = parse_call(meta)
            slices = decode_slices(call, blobs, limits)
            _validate(assistant, call, slices)
        except BankVersionError as exc:
            replies[i] = error_reply(str(exc), "bank_version", assistant)
            continue
        except (WireError, AssistantInputError) as exc:
            replies[i] = error_reply(str(exc), "bad_request", assistant)
            continue
        # A volume is answered on its own (its slices inform each other); other calls with the same
        # options share one predict.
        key = (tuple(sorted(call.class_ids)) if call.class_ids else None, call.return_probs, i if call.volume else -1)
        groups[key].append((i, call, slices))

    total = sum(len(s) for g in groups.values() for _, _, s in g)
    for (class_ids, return_probs, volume), members in groups.items():
        inputs = [
            SliceInput(image=s.image, slice_hash=s.hash, student_probs=s.probs)
            for _, _, sl in members
            for s in sl
        ]
        predict = assistant.predict_volume if volume >= 0 else assistant.predict
        try:
            outputs = predict(inputs, list(class_ids) if class_ids else None, return_probs)
        except AssistantInputError as exc:
            for i, _, _ in members:
                replies[i] = error_reply(str(exc), "bad_request", assistant)
            continue
        except Exception as exc:  # a bug or a device fault: answer it, keep serving
            log.exception("assistant batch failed")
            for i, _, _ in members:
                replies[i] = error_reply(
                    f"internal error: {type(exc).__name__}: {exc}", "internal", assistant
                )
            continue
        pos = 0
        elapsed = time.perf_counter() - t_start
        for i, _, sl in members:
            blobs: list[bytes] = []
            results = []
            for out in outputs[pos : pos + len(sl)]:
                if out.status != "ok":
                    results.append(WireSliceResult(status="miss", hash=out.slice_hash))
                    continue
                probs_spec = None
                if out.probs is not None:
                    # Probabilities travel as uint8 (p·255): a quarter of float32, plenty for prompts.
                    probs_spec = encode_array(
                        np.round(out.probs.astype(np.float32) * 255).astype(np.uint8), blobs
                    )
                results.append(
                    WireSliceResult(
                        status="ok",
                        hash=out.slice_hash,
                        confidence=[None if np.isnan(v) else float(v) for v in out.confidence],
                        label=encode_array(out.label, blobs),
                        probs=probs_spec,
                    )
                )
            pos += len(sl)
            replies[i] = (
                AssistReply(
                    slices=results,
                    model_version=assistant.model_version,
                    bank_version=assistant.bank.version,
                    timing={"batch_s": elapsed, "batch_slices": float(total)},
                ),
                blobs,
            )
    return replies  # type: ignore[return-value]

"""The client side of the Redis path, used by every producer of requests: trainers, labeling jobs,
the demo and the benchmarks (docs/protocol.md).

`AsyncStreamClient` is the asyncio core: `submit(...) -> request id` (waits only when `max_in_flight`
requests are already out: that is the backpressure), `result(id, timeout)`, and `results()`, an async
iterator over answers in completion order. A slice the assistant has embedded before travels by its
content hash alone; if the assistant answers "miss" (another replica, or its cache evicted it), the
client resends those slices with their pixels by itself and completes the request when they are back.
Each request id completes once, whatever Redis or the dispatcher redeliver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, OutOfMemoryError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.hashing import slice_hash
from shared.wire.arrays import WireError, decode_array
from shared.wire.connection import auth_error, connect
from shared.wire.messages import (
    REQUEST_STREAM,
    RequestEnvelope,
    done_key,
    new_request_id,
    parse_result,
    request_fields,
    result_stream,
)
from shared.wire.protocol import encode_call

log = logging.getLogger("vessa.stream_client")


class QueueFullError(RuntimeError):
    """Redis refused the request: it reached maxmemory (the queue runs with noeviction)."""


@dataclass
class ClientResult:
    """status "ok" (labels (B, H, W) uint8, confidence (B, C) float32) or "error"/"dead" with a reason."""

    request_id: str
    status: str
    labels: np.ndarray | None = None
    confidence: np.ndarray | None = None
    probs: np.ndarray | None = None
    error: str | None = None
    model_version: str = ""
    bank_version: int = -1
    latency_s: float = 0.0
    resent: int = 0


@dataclass
class _Pending:
    images: np.ndarray  # (B, H, W) uint8 as sent
    hashes: list[str]
    probs: np.ndarray | None
    class_ids: list[int] | None
    future: asyncio.Future
    t0: float
    labels: list[np.ndarray | None] = field(default_factory=list)
    confidence: list[np.ndarray | None] = field(default_factory=list)
    return_probs: bool = False  # ask for the assistant's per-class probabilities too
    volume: bool = False  # the images are one volume in order: answered as a whole (AssistCall.volume)
    out_probs: list[np.ndarray | None] = field(default_factory=list)  # (C, H, W) uint8 p·255 each
    parent: str | None = None  # for a resend: the request it completes
    children: dict[str, list[int]] = field(default_factory=dict)  # resend id → slice positions
    resent: int = 0
    meta: dict = field(default_factory=dict)
    sent_at: float = field(default_factory=time.perf_counter)
    entry_id: bytes | str | None = None  # the request's entry on the request stream (root requests)


class AsyncStreamClient:
    def __init__(
        self,
        redis_url: str,
        trainer_id: str,
        max_in_flight: int = 8,
        request_stream: str = REQUEST_STREAM,
        blob_threshold: int = 8 * 1024 * 1024,
        blob_ttl_s: int = 900,
        send_hashes: bool = True,
        resend_after_s: float = 60.0,
    ):
        self.redis: aioredis.Redis = connect(redis_url)
        # The blocking XREAD gets its own connection without redis-py's retry wrapper (the read loop
        # backs off by itself), so a cancelled read ends at once instead of being retried.
        self._reader_redis: aioredis.Redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=5)
        self._url = redis_url
        self.trainer_id = trainer_id
        self.reply_stream = result_stream(trainer_id)
        self.request_stream = request_stream
        self.blob_threshold = blob_threshold
        self.blob_ttl_s = blob_ttl_s
        self.send_hashes = send_hashes
        self.resend_after_s = resend_after_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pending: dict[str, _Pending] = {}
        self._known: set[str] = set()  # hashes the assistant has embedded
        self._done: asyncio.Queue[ClientResult] = asyncio.Queue()
        self._finished: OrderedDict[str, ClientResult] = OrderedDict()  # completed, not yet taken by result()
        self._reader: asyncio.Task | None = None
        self._last_id = "0-0"
        self._closing = False
        self.stats = {
            "submitted": 0,
            "answered": 0,
            "errors": 0,
            "duplicates": 0,
            "resent_slices": 0,
            "hash_only_slices": 0,
            "queue_full": 0,
            "resent_requests": 0,
        }

    async def start(self) -> None:
        """Remember where the reply stream ends now, then start reading it."""
        backoff = 0.1
        while True:
            try:
                info = await self.redis.xinfo_stream(self.reply_stream)
                self._last_id = info["last-generated-id"]
                break
            except ResponseError:  # no such stream yet
                self._last_id = "0-0"
                break
            except AuthenticationError as exc:  # a wrong or missing password: retrying will not help
                raise auth_error(self._url, exc) from None
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis unreachable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 5.0)
        self._reader = asyncio.create_task(self._read_loop())
        self._watchdog = asyncio.create_task(self._resend_loop())

    async def close(self) -> None:
        log.debug("closing stream client %s", self.trainer_id)
        # redis-py turns a cancelled read into a closed connection, which the read loop would treat as
        # an outage and retry: the flag tells it to stop instead.
        self._closing = True
        for task in (self._reader, getattr(self, "_watchdog", None)):
            if task:
                task.cancel()
                try:
                    await asyncio.wait_for(task, 5)
                except (asyncio.CancelledError, Exception):
                    pass
        try:
            # A connection cancelled mid-XREAD can leave redis-py's pool waiting: bound the close.
            await asyncio.wait_for(self.redis.aclose(), 5)
            await asyncio.wait_for(self._reader_redis.aclose(), 5)
        except (TimeoutError, Exception) as exc:
            log.debug("closing the redis client: %s", exc)

    async def _resend_loop(self) -> None:
        """Resend, under the same id, requests that Redis lost (a crash inside its fsync window).

        A request unanswered for `resend_after_s` is checked, not blindly resent: while its entry is
        still on the request stream it is merely queued or being worked on (a busy assistant is not a
        lost request, and resending would only add load), and once its done marker exists its result is
        on the way. Only an entry that is gone without a result is sent again; each request still
        completes once."""
        while True:
            await asyncio.sleep(max(0.5, self.resend_after_s / 4))
            now = time.perf_counter()
            for rid, p in list(self._pending.items()):
                if p.parent is not None or p.children or now - p.sent_at <= self.resend_after_s:
                    continue
                p.sent_at = now
                try:
                    if p.entry_id is not None and await self.redis.xrange(self.request_stream, p.entry_id, p.entry_id, count=1):
                        continue
                    if await self.redis.exists(done_key(rid)):
                        continue
                    self.stats["resent_requests"] += 1
                    await self._send(rid, list(range(len(p.images))), p, allow_hash=False)
                except Exception as exc:
                    log.warning("resend check of %s failed: %s", rid, exc)

    # ------------------------------------------------------------------------------------------ submit
    async def submit(
        self,
        images: np.ndarray,
        probs: np.ndarray | None = None,
        class_ids: list[int] | None = None,
        request_id: str | None = None,
        deadline_s: float | None = None,
        return_probs: bool = False,
        volume: bool = False,
    ) -> str:
        """images: (B, H, W) uint8 canonical slices; probs: (B, C, H, W) uint8 (p·255) or float, or None.
        `return_probs`: the result's `probs` holds the assistant's (B, C, H, W) uint8 p·255 as well.
        `volume`: the images are one volume in through-plane order, answered as one piece (3D context
        and cleaning); its pixels are always sent (a hash-only slice the replica lost would be a hole).
        Waits while `max_in_flight` requests are out; raises QueueFullError when Redis is full."""
        await self._slots.acquire()
        rid = request_id or new_request_id()
        hashes = [slice_hash(img) for img in images]
        loop = asyncio.get_running_loop()
        p = _Pending(images, hashes, probs, class_ids, loop.create_future(), time.perf_counter())
        p.labels = [None] * len(images)
        p.confidence = [None] * len(images)
        p.return_probs = return_probs
        p.volume = volume
        p.out_probs = [None] * len(images)
        self._pending[rid] = p
        try:
            await self._send(rid, list(range(len(images))), p, allow_hash=self.send_hashes and not volume)
        except BaseException:
            self._pending.pop(rid, None)
            self._slots.release()
            raise
        self.stats["submitted"] += 1
        return rid

    async def _send(self, rid: str, positions: list[int], p: _Pending, allow_hash: bool) -> None:
        imgs: list[np.ndarray | None] = []
        hs: list[str | None] = []
        for i in positions:
            hash_only = allow_hash and p.hashes[i] in self._known
            imgs.append(None if hash_only else p.images[i])
            hs.append(p.hashes[i])
            self.stats["hash_only_slices"] += int(hash_only)
        prob_list = [p.probs[i] for i in positions] if p.probs is not None else None
        call, blobs = encode_call(
            imgs, hs, prob_list, class_ids=p.class_ids, return_probs=p.return_probs, volume=p.volume
        )
        env = RequestEnvelope(
            request_id=rid,
            trainer_id=self.trainer_id,
            reply_stream=self.reply_stream,
            call=call,
            n_blobs=len(blobs),
        )
        size = sum(len(b) for b in blobs)
        backoff = 0.1
        for attempt in range(8):
            try:
                if size > self.blob_threshold:
                    # A large payload waits under its own key (with a TTL); only the key travels.
                    key = f"vessa:blob:{rid}"
                    env.blob_key = key
                    async with self.redis.pipeline(transaction=True) as pipe:
                        pipe.delete(key)
                        pipe.rpush(key, *blobs)
                        pipe.expire(key, self.blob_ttl_s)
                        pipe.xadd(self.request_stream, request_fields(env, None))
                        entry_id = (await pipe.execute())[-1]
                else:
                    entry_id = await self.redis.xadd(self.request_stream, request_fields(env, blobs))
                p.entry_id = entry_id
                return
            except ResponseError as exc:
                # redis-py ≥ 4 raises OutOfMemoryError and strips the "OOM" code from the message
                if isinstance(exc, OutOfMemoryError) or "OOM" in str(exc):
                    self.stats["queue_full"] += 1
                    raise QueueFullError(
                        "Redis is full (maxmemory reached; the queue runs noeviction so nothing is dropped): "
                        "the request was not queued — slow down or raise maxmemory"
                    ) from exc
                raise
            except AuthenticationError as exc:
                raise auth_error(self._url, exc) from None
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if attempt == 7:
                    raise
                log.warning("submit: redis unavailable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 5.0)

    # ------------------------------------------------------------------------------------------ results
    async def _read_loop(self) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                resp = await self._reader_redis.xread(
                    {self.reply_stream: self._last_id}, count=64, block=1000
                )
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self._closing:
                    return
                log.warning("results: redis unavailable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, 5.0)
                continue
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    try:
                        await self._on_result(fields)
                    except Exception:
                        log.exception("cannot handle result entry %s", entry_id)

    async def _on_result(self, fields: dict) -> None:
        try:
            env, blobs = parse_result(fields)
        except WireError as exc:
            log.error("malformed result: %s", exc)
            return
        p = self._pending.get(env.request_id)
        if p is None:
            self.stats["duplicates"] += 1  # already completed (a redelivery) or abandoned
            return
        root_id = p.parent or env.request_id
        root = self._pending.get(root_id)
        if root is None:
            self._pending.pop(env.request_id, None)
            return
        if env.status != "ok" or env.reply is None:
            self._pending.pop(env.request_id, None)
            self._complete(root_id, ClientResult(root_id, env.status, error=env.error or "assistant error"))
            return
        reply = env.reply
        positions = root.children.pop(env.request_id) if p.parent else list(range(len(root.images)))
        if p.parent:
            self._pending.pop(env.request_id, None)
        missing = []
        for pos, s in zip(positions, reply.slices):
            if s.status == "miss":
                self._known.discard(root.hashes[pos])
                missing.append(pos)
                continue
            self._known.add(s.hash)
            root.labels[pos] = decode_array(s.label, blobs)
            root.confidence[pos] = np.array(
                [np.nan if v is None else v for v in s.confidence], dtype=np.float32
            )
            if root.return_probs and s.probs is not None:
                root.out_probs[pos] = decode_array(s.probs, blobs)
        root.meta = {"model_version": reply.model_version, "bank_version": reply.bank_version}
        if missing:
            # The assistant did not have those embeddings: resend the slices with their pixels.
            child = new_request_id()
            root.children[child] = missing
            root.resent += len(missing)
            self.stats["resent_slices"] += len(missing)
            self._pending[child] = _Pending(
                root.images,
                root.hashes,
                root.probs,
                root.class_ids,
                root.future,
                time.perf_counter(),
                parent=root_id,
            )
            sub = _Pending(
                root.images[missing],
                [root.hashes[i] for i in missing],
                root.probs[missing] if root.probs is not None else None,
                root.class_ids,
                root.future,
                time.perf_counter(),
                return_probs=root.return_probs,
            )
            await self._send(child, list(range(len(missing))), sub, allow_hash=False)
            return
        if root.children:
            return  # still waiting for a resend
        self._complete(
            root_id,
            ClientResult(
                root_id,
                "ok",
                labels=np.stack(root.labels),
                confidence=np.stack(root.confidence),
                probs=np.stack(root.out_probs) if root.return_probs and all(x is not None for x in root.out_probs) else None,
                model_version=root.meta.get("model_version", ""),
                bank_version=root.meta.get("bank_version", -1),
                latency_s=time.perf_counter() - root.t0,
                resent=root.resent,
            ),
        )

    def _complete(self, rid: str, result: ClientResult) -> None:
        p = self._pending.pop(rid, None)
        if p is None:
            return
        for child in list(p.children):
            self._pending.pop(child, None)
        self.stats["answered" if result.status == "ok" else "errors"] += 1
        if not p.future.done():
            p.future.set_result(result)
        self._finished[rid] = result
        while len(self._finished) > 10_000:
            self._finished.popitem(last=False)
        self._done.put_nowait(result)
        self._slots.release()

    async def result(self, rid: str, timeout: float) -> ClientResult | None:
        """The result of `rid`, or None after `timeout` seconds (the request stays in flight)."""
        if rid in self._finished:
            return self._finished.pop(rid)
        p = self._pending.get(rid)
        if p is None:
            return None
        try:
            res = await asyncio.wait_for(asyncio.shield(p.future), timeout)
        except TimeoutError:
            return None
        self._finished.pop(rid, None)
        return res

    def abandon(self, rid: str) -> None:
        """Stop waiting for `rid` (its answer, if it comes, is dropped) and free its slot."""
        p = self._pending.pop(rid, None)
        if p is not None:
            for child in list(p.children):
                self._pending.pop(child, None)
            if not p.future.done():
                p.future.cancel()
            self._slots.release()

    async def results(self) -> AsyncIterator[ClientResult]:
        """Results in completion order, forever (stop iterating when you have what you need)."""
        while True:
            yield await self._done.get()

    @property
    def in_flight(self) -> int:
        return sum(1 for p in self._pending.values() if p.parent is None)

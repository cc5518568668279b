"""The backlog autoscaling policy's parts: the backlog read from a real Redis, and the decision rule.
(Replicas coming and going on a real cluster: tests/e2e/test_multinode.py.)"""

from __future__ import annotations

import time
from types import SimpleNamespace

import redis

from services.dispatch.autoscaling import BacklogPolicy, decide, stream_backlog
from shared.wire.messages import GROUP, REQUEST_STREAM


def _ctx(current: int, target: int, ongoing: float, per_replica: float = 64):
    return SimpleNamespace(
        current_num_replicas=current,
        target_num_replicas=target,
        total_num_requests=ongoing,
        config=SimpleNamespace(get_target_ongoing_requests=lambda: per_replica),
    )


def test_backlog_is_undelivered_plus_pending(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    assert stream_backlog(r) == 0  # no stream yet
    for i in range(10):
        r.xadd(REQUEST_STREAM, {"i": i})
    assert stream_backlog(r) == 10  # no group yet: everything waits
    r.xgroup_create(REQUEST_STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "c1", {REQUEST_STREAM: ">"}, count=4)  # 4 pending, 6 never delivered
    assert stream_backlog(r) == 10
    ids = [e for e, _ in r.xrange(REQUEST_STREAM, count=3)]
    r.xack(REQUEST_STREAM, GROUP, *ids)
    assert stream_backlog(r) == 7
    r.xtrim(REQUEST_STREAM, minid=ids[-1].decode().replace("-0", "-1"))  # trimmed acknowledged entries
    assert stream_backlog(r) == 7


def test_decision_follows_the_larger_of_ongoing_calls_and_backlog():
    # Serve's own rule: ongoing / target per replica
    assert decide(_ctx(2, 2, ongoing=256), backlog=None, backlog_per_replica=64)[0] == 4
    # a backlog the dispatchers' in-flight cap hides from Serve: 32 ongoing, 500 queued
    assert decide(_ctx(1, 1, ongoing=32), backlog=500, backlog_per_replica=64)[0] == 8
    # idle: both zero, Serve's bounds (min_replicas) take it from there
    assert decide(_ctx(3, 3, ongoing=0), backlog=0, backlog_per_replica=64)[0] == 0
    # no replica yet and nothing queued: keep the target
    assert decide(_ctx(0, 1, ongoing=0), backlog=0, backlog_per_replica=64)[0] == 1


def test_policy_reads_the_backlog_in_the_background_and_forgets_stale_figures(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    for i in range(40):
        r.xadd(REQUEST_STREAM, {"i": i})
    policy = BacklogPolicy(backlog_per_replica=16, redis_url=redis_server.url, poll_interval_s=0.1, stale_after_s=1.0)
    deadline = time.monotonic() + 10
    while policy.backlog() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert policy.backlog() == 40
    assert policy(_ctx(1, 1, ongoing=0))[0] == 3  # ceil(40 / 16)
    redis_server.stop()
    time.sleep(1.5)
    assert policy.backlog() is None  # Redis gone: ongoing requests alone
    assert policy(_ctx(1, 1, ongoing=0))[0] == 0

"""The gateway's request budgets when each replica counts locally and settles with Redis in batches
(services/gateway/ratelimit.py): still global across replicas within the stated error, exact for one
replica and for small limits, and an unreachable Redis behaves as it did before local counting."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.gateway.app import create_app as gateway_app
from services.gateway.ratelimit import SLACK_DIVISOR, SYNC_INTERVAL_SECONDS, SlidingWindowLimiter, slack
from shared.errors import RateLimited
from tests.conftest import free_port, serve_app


async def test_two_gateways_sharing_redis_enforce_one_budget_within_the_stated_error(settings):
    limit = 200
    shared_budget = settings.model_copy(update={"rate_limit_anonymous": limit, "trusted_proxies": ["127.0.0.1"]})
    caller = {"X-Forwarded-For": "203.0.113.50"}
    async with (
        serve_app(gateway_app(shared_budget)) as first,
        serve_app(gateway_app(shared_budget)) as second,
        httpx.AsyncClient(timeout=20) as client,
    ):

        async def one(base: str) -> int:
            # Not routed to any service: the gateway answers 404 itself, after counting the request.
            return (await client.get(base + "/api/v1/no-such-thing", headers=caller)).status_code

        codes: list[int] = []
        for _ in range(12):
            # Bursts to both replicas at once, so each admits hits the other has not heard of yet.
            codes += await asyncio.gather(*(one(first if n % 2 else second) for n in range(40)))
        other = await client.get(second + "/api/v1/no-such-thing", headers={"X-Forwarded-For": "203.0.113.51"})
    admitted = codes.count(404)
    assert set(codes) <= {404, 429}
    # Never refused before the global count reached the limit, never more over it than the stated bound.
    assert limit <= admitted <= limit + 2 * slack(limit)
    assert other.status_code == 404  # another address keeps its own budget


async def test_one_replica_counting_locally_is_exact(redis, namespace):
    limiter = SlidingWindowLimiter(redis, f"{namespace}:ratelimit")
    limit = 400
    assert slack(limit) > 0
    decisions = [await limiter.hit("ip:192.0.2.1", limit=limit, window_seconds=60, exact=False) for _ in range(limit)]
    assert all(d.allowed for d in decisions)
    blocked = await limiter.hit("ip:192.0.2.1", limit=limit, window_seconds=60, exact=False)
    assert not blocked.allowed
    assert 1 <= blocked.retry_after_seconds <= 60
    # Every admitted hit reached Redis, where the other replicas see it.
    assert await redis.zcard(f"{namespace}:ratelimit:ip:192.0.2.1") == limit
    with pytest.raises(RateLimited):
        await limiter.enforce("ip:192.0.2.1", limit=limit, window_seconds=60, what="test", fail_open=True)


async def test_one_replica_under_concurrent_bursts_admits_exactly_its_limit(redis, namespace):
    # Bursts arrive while a settle is in flight: what that settle carries must still count against the limit.
    limiter = SlidingWindowLimiter(redis, f"{namespace}:ratelimit")
    limit = 1000
    admitted = 0
    for burst in (60, 80, 100, 120, 150, 200, 250, 300):
        decisions = await asyncio.gather(
            *(limiter.hit("ip:192.0.2.3", limit=limit, window_seconds=60, exact=False) for _ in range(burst))
        )
        admitted += sum(d.allowed for d in decisions)
    assert admitted == limit
    assert await redis.zcard(f"{namespace}:ratelimit:ip:192.0.2.3") == limit


async def test_hits_admitted_locally_are_not_forgotten_when_a_settle_fails(redis, namespace):
    limiter = SlidingWindowLimiter(redis, f"{namespace}:ratelimit")
    key, limit = "ip:192.0.2.4", 400
    await limiter.hit(key, limit=limit, window_seconds=60, exact=False)  # learns the global count
    local = [await limiter.hit(key, limit=limit, window_seconds=60, exact=False) for _ in range(5)]
    assert all(d.allowed for d in local)
    assert await redis.zcard(f"{namespace}:ratelimit:{key}") == 1  # the five are only counted locally so far
    # The next settle fails on a real Redis error (the key holds a string, so the script's ZADD refuses).
    stored = await redis.dump(f"{namespace}:ratelimit:{key}")
    await redis.delete(f"{namespace}:ratelimit:{key}")
    await redis.set(f"{namespace}:ratelimit:{key}", "not a sorted set")
    await asyncio.sleep(SYNC_INTERVAL_SECONDS * 2)  # the local view is out of date: the next hit settles
    with pytest.raises(RedisError):
        await limiter.hit(key, limit=limit, window_seconds=60, exact=False)
    await redis.delete(f"{namespace}:ratelimit:{key}")
    await redis.restore(f"{namespace}:ratelimit:{key}", 0, stored)
    await limiter.hit(key, limit=limit, window_seconds=60, exact=False)
    # The first hit, the five admitted locally, and the one after Redis answered again: none forgotten.
    assert await redis.zcard(f"{namespace}:ratelimit:{key}") == 7


async def test_small_limits_are_exact_across_replicas(redis, namespace):
    first = SlidingWindowLimiter(redis, f"{namespace}:ratelimit")
    second = SlidingWindowLimiter(redis, f"{namespace}:ratelimit")
    limit = SLACK_DIVISOR - 1
    assert slack(limit) == 0
    allowed = [
        (await limiter.hit("user:u1", limit=limit, window_seconds=60, exact=False)).allowed
        for _ in range(limit)
        for limiter in (first, second)
    ]
    assert allowed.count(True) == limit


async def test_unreachable_redis_fails_open_only_where_it_did(namespace):
    down = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    limiter = SlidingWindowLimiter(down, f"{namespace}:ratelimit")
    try:
        for _ in range(3):
            await limiter.enforce("ip:192.0.2.9", limit=1000, window_seconds=60, what="test", fail_open=True)
        with pytest.raises((RedisError, OSError)):
            await limiter.enforce("login-ip:192.0.2.9", limit=1000, window_seconds=60, what="test")
    finally:
        await down.aclose()

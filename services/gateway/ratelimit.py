"""Sliding-window rate limits in Redis, shared by every gateway replica."""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.errors import RateLimited

log = structlog.get_logger("gateway")

# A log of request times per key in a sorted set: drop the ones outside the window, admit while fewer
# than `limit` remain. One script keeps the check-and-add atomic across replicas.
_SLIDING_WINDOW = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, window)
  return {1, limit - count - 1, 0}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, 0, window - (now - tonumber(oldest[2]))}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    remaining: int
    retry_after_seconds: int


class SlidingWindowLimiter:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self._script = redis.register_script(_SLIDING_WINDOW)

    async def hit(self, key: str, *, limit: int, window_seconds: int) -> Decision:
        now_ms = int(time.time() * 1000)
        allowed, remaining, retry_ms = await self._script(
            keys=[f"{self.prefix}:{key}"], args=[now_ms, window_seconds * 1000, limit, f"{now_ms}-{uuid.uuid4().hex}"]
        )
        return Decision(bool(allowed), int(remaining), max(1, math.ceil(int(retry_ms) / 1000)) if not allowed else 0)

    async def enforce(self, key: str, *, limit: int, window_seconds: int, what: str, fail_open: bool = False) -> None:
        """Raise RateLimited past the limit. With ``fail_open`` a Redis outage admits the request (reads that
        PostgreSQL can serve keep working); otherwise the outage propagates and the caller gets a 503."""
        try:
            decision = await self.hit(key, limit=limit, window_seconds=window_seconds)
        except (RedisError, OSError) as exc:
            if not fail_open:
                raise
            log.warning("rate_limit_unavailable", key_kind=key.split(":", 1)[0], error=type(exc).__name__)
            return
        if not decision.allowed:
            raise RateLimited(
                f"too many requests ({what}: {limit} per {window_seconds}s); retry later",
                retry_after=decision.retry_after_seconds,
            )

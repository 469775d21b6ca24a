"""Sliding-window rate limits in Redis, shared by every gateway replica.

Limits that fail open (the per-address and per-account request budgets) are counted locally first and
settled with Redis in batches, as Envoy pairs a local with a global limiter: a replica admits up to
``slack(limit)`` hits of a key on its own, then pushes them (with their real times) in the same script call
that decides the next hit. One settle per key is in flight at a time, and no hit is admitted locally while it
is (the hits it carries are then in no local count), so one replica alone is exact.

Error bound, per key and window: at most ``limit + replicas * slack(limit)`` requests are admitted, where
``slack(limit) = min(MAX_SLACK, limit // SLACK_DIVISOR)`` (so at most 5% per replica). Limits under
SLACK_DIVISOR (20) have no slack and are exact, like every limit that does not fail open (sign-in throttles).
Denials are always decided by Redis, so nothing is refused before the global count really reached the limit.
A Redis outage behaves as before: the hit goes to Redis, fails, and the caller decides (fail open, or the
error propagates); hits admitted locally and not yet settled wait for the next settle.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass, field

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

# The batched form: first record the hits this replica already admitted on its own (ARGV[5..]: score,
# member pairs, at the times they happened), then decide the current hit exactly as above. Returns the
# decision plus the window's count after it, which the replica keeps as its view of the global count.
_SETTLE_AND_HIT = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if #ARGV > 4 then
  redis.call('ZADD', key, unpack(ARGV, 5))
end
local count = redis.call('ZCARD', key)
if count < limit then
  redis.call('ZADD', key, now, ARGV[4])
  redis.call('PEXPIRE', key, window)
  return {1, limit - count - 1, 0, count + 1}
end
redis.call('PEXPIRE', key, window)
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return {0, 0, window - (now - tonumber(oldest[2])), count}
"""

SLACK_DIVISOR = 20
MAX_SLACK = 50
# How long a replica trusts its last view of a key's global count before asking Redis again.
SYNC_INTERVAL_SECONDS = 0.1
# Keys tracked locally at most; past that a new key is simply counted in Redis on every hit.
MAX_LOCAL_KEYS = 100_000


def slack(limit: int) -> int:
    """Hits of one key a replica may admit before telling Redis (see the module docstring)."""
    return min(MAX_SLACK, limit // SLACK_DIVISOR)


@dataclass(slots=True)
class _Local:
    """One key's state in this replica: the global count Redis reported, when, and the hits admitted since."""

    known: int
    synced_at: float  # time.monotonic()
    expires_at: float  # time.monotonic(): nothing of this state matters after its window has passed
    pending: list[int] = field(default_factory=list)  # ms timestamps of locally admitted hits


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
        self._settle = redis.register_script(_SETTLE_AND_HIT)
        self._local: dict[str, _Local] = {}
        self._settling: dict[str, asyncio.Lock] = {}
        self._pruned_at = time.monotonic()
        # Sorted-set members only need to be unique: this replica's random id plus a counter.
        self._member_prefix = uuid.uuid4().hex[:12]
        self._counter = 0

    def _member(self, now_ms: int) -> str:
        self._counter += 1
        return f"{now_ms}-{self._member_prefix}-{self._counter}"

    async def hit(self, key: str, *, limit: int, window_seconds: int, exact: bool = True) -> Decision:
        """Count one hit of ``key``. ``exact=False`` lets this replica admit up to ``slack(limit)`` hits
        before settling with Redis (see the module docstring for the error bound)."""
        now_ms = int(time.time() * 1000)
        if exact or slack(limit) == 0:
            allowed, remaining, retry_ms = await self._script(
                keys=[f"{self.prefix}:{key}"], args=[now_ms, window_seconds * 1000, limit, self._member(now_ms)]
            )
            return _decision(allowed, remaining, retry_ms)
        return await self._hit_batched(key, limit, window_seconds, now_ms)

    async def _hit_batched(self, key: str, limit: int, window_seconds: int, now_ms: int) -> Decision:
        admitted = self._admit_locally(key, limit)
        if admitted is not None:
            return admitted
        if time.monotonic() - self._pruned_at > window_seconds:
            self._prune(time.monotonic())
        if len(self._settling) >= MAX_LOCAL_KEYS:
            return await self._settle_key(key, limit, window_seconds, now_ms)
        # One settle per key at a time: hits that arrive meanwhile wait for its answer and are then admitted
        # against it, instead of against a view that misses the hits the settle carries (which let one
        # replica alone past its limit) or each asking Redis on their own.
        lock = self._settling.setdefault(key, asyncio.Lock())
        async with lock:
            admitted = self._admit_locally(key, limit)
            if admitted is not None:
                return admitted
            return await self._settle_key(key, limit, window_seconds, int(time.time() * 1000))

    def _admit_locally(self, key: str, limit: int) -> Decision | None:
        now = time.monotonic()
        state = self._local.get(key)
        if state is None:
            return None
        if now >= state.expires_at:
            del self._local[key]  # its window has passed: its hits have expired in Redis as well
            return None
        used = state.known + len(state.pending)
        if now - state.synced_at < SYNC_INTERVAL_SECONDS and used < limit and len(state.pending) < slack(limit):
            state.pending.append(int(time.time() * 1000))
            return Decision(True, max(0, limit - used - 1), 0)
        return None

    async def _settle_key(self, key: str, limit: int, window_seconds: int, now_ms: int) -> Decision:
        """This hit and the key's locally admitted ones, sent to Redis in one script call."""
        state = self._local.get(key)
        pending = state.pending if state is not None else []
        if state is not None:
            state.pending = []
            # Out of date until Redis answers: the hits this call carries are in neither ``known`` nor
            # ``pending`` meanwhile, so admitting against that view would let one replica past its limit.
            state.synced_at = -math.inf
        args: list[int | str] = [now_ms, window_seconds * 1000, limit, self._member(now_ms)]
        for at_ms in pending:
            args += [at_ms, self._member(at_ms)]
        try:
            allowed, remaining, retry_ms, count = await self._settle(keys=[f"{self.prefix}:{key}"], args=args)
        except BaseException:
            # Redis is unreachable (or the request was cancelled): the hits this call carried were admitted, so
            # they go back to wait for the next settle, and the view is marked out of date so that the next hit
            # asks Redis again, exactly as without local counting.
            current = self._local.get(key)
            if current is not None:
                current.pending[:0] = pending
                current.synced_at = -math.inf
            raise
        synced = time.monotonic()
        state = self._local.get(key)
        if state is None:
            if len(self._local) < MAX_LOCAL_KEYS:
                self._local[key] = _Local(int(count), synced, synced + window_seconds + 1.0)
        else:
            state.known, state.synced_at = int(count), synced
            state.expires_at = synced + window_seconds + 1.0
        return _decision(allowed, remaining, retry_ms)

    def _prune(self, now: float) -> None:
        """Drop the keys whose window has passed (their hits have expired in Redis too)."""
        self._pruned_at = now
        for key in [k for k, state in self._local.items() if now >= state.expires_at]:
            del self._local[key]
        for key in [k for k, lock in self._settling.items() if not lock.locked() and k not in self._local]:
            del self._settling[key]

    async def enforce(self, key: str, *, limit: int, window_seconds: int, what: str, fail_open: bool = False) -> None:
        """Raise RateLimited past the limit. With ``fail_open`` a Redis outage admits the request (reads that
        PostgreSQL can serve keep working); otherwise the outage propagates and the caller gets a 503."""
        try:
            # Only limits that fail open are counted locally first: a sign-in throttle stays exact and still
            # refuses while Redis is down.
            decision = await self.hit(key, limit=limit, window_seconds=window_seconds, exact=not fail_open)
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


def _decision(allowed: int, remaining: int, retry_ms: int) -> Decision:
    return Decision(bool(allowed), int(remaining), max(1, math.ceil(int(retry_ms) / 1000)) if not allowed else 0)

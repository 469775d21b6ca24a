"""Redis Streams: a publisher and a consumer-group consumer.

Delivery is at least once. A consumer acks an entry only after its handler succeeded; entries left
pending by a consumer that died are claimed by another after ``claim_idle_ms`` (XPENDING + XCLAIM); an entry
delivered ``max_deliveries`` times without success, or one that can never succeed (``PoisonMessage``),
moves to the dead-letter stream ``<stream>:dlq`` and is acked so the rest keep flowing. Handlers must be
idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.backoff import jittered_backoff
from shared.errors import store_unavailable
from shared.logging import get_correlation_id, new_correlation_id, set_correlation_id
from shared.settings import Settings

log = structlog.get_logger("streams")

TICKS_STREAM = "ticks"
PRICES_STREAM = "prices"
# Email requests for the alerting service's sender: {"id", "to", "subject", "text"}.
EMAILS_STREAM = "emails"
# Failures of sources run outside ingest (the conversion service's ECB job): {"id", "source", "kind",
# "message", "at"}. Ingest owns the error log and writes them there (services/ingest/consumers.py).
SOURCE_ERRORS_STREAM = "source-errors"
# Alert triggers, published by the alerting service after the event is stored (services/alerting/events.py
# builds them): what the gateway's live websocket pushes to the alert's owner.
ALERT_EVENTS_STREAM = "alert-events"


class StoreUnavailable(Exception):
    """A handler failed because PostgreSQL (or another store) is unreachable: retry later, don't count it."""


class PoisonMessage(Exception):
    """The entry can never be processed (malformed, missing fields): dead-letter it at once."""


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def encode(payload: dict[str, Any], correlation_id: str | None = None) -> dict[str, str]:
    return {
        "data": json.dumps(payload, default=_json_default, separators=(",", ":")),
        "cid": correlation_id or get_correlation_id() or new_correlation_id(),
    }


@dataclass(slots=True)
class StreamMessage:
    id: str
    fields: dict[str, str]
    deliveries: int = 1
    _payload: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def correlation_id(self) -> str | None:
        return self.fields.get("cid")

    def payload(self) -> dict[str, Any]:
        if self._payload is None:
            raw = self.fields.get("data")
            if raw is None:
                raise PoisonMessage("entry has no 'data' field")
            try:
                decoded = json.loads(raw)
            except ValueError as exc:
                raise PoisonMessage(f"entry 'data' is not valid JSON: {exc}") from None
            if not isinstance(decoded, dict):
                raise PoisonMessage("entry 'data' is not a JSON object")
            self._payload = decoded
        return self._payload


class StreamPublisher:
    def __init__(self, redis: Redis, *, namespace: str, maxlen: int) -> None:
        self.redis = redis
        self.namespace = namespace
        self.maxlen = maxlen
        self._publish_once: Any = None

    def stream_key(self, stream: str) -> str:
        return f"{self.namespace}:stream:{stream}"

    async def publish(self, stream: str, payload: dict[str, Any]) -> str:
        entry_id = await self.redis.xadd(self.stream_key(stream), encode(payload), maxlen=self.maxlen, approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def publish_many(self, stream: str, payloads: Sequence[dict[str, Any]]) -> int:
        if not payloads:
            return 0
        key = self.stream_key(stream)
        # One correlation id for the batch: the entries were produced by one poll or one consolidation.
        cid = get_correlation_id() or new_correlation_id()
        async with self.redis.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.xadd(key, encode(payload, cid), maxlen=self.maxlen, approximate=True)
            await pipe.execute()
        return len(payloads)

    async def publish_once(self, stream: str, events: Sequence[tuple[str, dict[str, Any]]], ttl: int) -> int:
        """Publish ``(event_id, payload)`` pairs so that an event id reaches the stream at most once within
        ``ttl`` seconds, however often it is relayed: the marker and the entry are written by one script,
        atomically. Returns how many entries were added."""
        if not events:
            return 0
        key = self.stream_key(stream)
        cid = get_correlation_id() or new_correlation_id()
        if self._publish_once is None:
            self._publish_once = self.redis.register_script(_PUBLISH_ONCE)
        async with self.redis.pipeline(transaction=False) as pipe:
            for event_id, payload in events:
                fields = encode(payload, cid)
                await self._publish_once(
                    keys=[key, f"{key}:published:{event_id}"],
                    args=[self.maxlen, ttl, fields["data"], fields["cid"]],
                    client=pipe,
                )
            results = await pipe.execute()
        return sum(1 for r in results if r)


# KEYS: stream, marker; ARGV: maxlen, marker ttl, data, cid.
_PUBLISH_ONCE = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[3], 'cid', ARGV[4])
end
return false
"""


BatchHandler = Callable[[list[StreamMessage]], Awaitable[None]]
MessageHandler = Callable[[StreamMessage], Awaitable[None]]

# How often a consumer reads its group's pending count and lag (XINFO GROUPS) for the gauges.
GROUP_METRICS_SECONDS = 5.0


class StreamMetrics:
    """The stream consumers' metrics of one service: made once per registry (the service's
    ``Resources.stream_metrics``) and shared by all its consumers, which label them with their stream (the
    logical name, without the namespace) and group."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.processed = Counter(
            "stream_entries_processed_total",
            "Stream entries a consumer finished with, by outcome: acked (handled), failed (handler raised; left "
            "pending for a retry), dead_lettered, lost (trimmed from the stream before they were handled)",
            ["stream", "group", "outcome"],
            registry=registry,
        )
        self.pending = Gauge(
            "stream_pending_entries",
            "Entries delivered to the group and not acknowledged yet (XINFO GROUPS pending)",
            ["stream", "group"],
            registry=registry,
        )
        self.lag = Gauge(
            "stream_lag_entries",
            "Entries in the stream not delivered to the group yet (XINFO GROUPS lag; absent while Redis cannot "
            "tell, e.g. Redis 6.2 or after entries were deleted)",
            ["stream", "group"],
            registry=registry,
        )


def decode_text(value: bytes | str) -> str:
    """A Redis reply (bytes: the clients here do not decode) as text; bytes that are not UTF-8 are replaced,
    so that a stray entry never raises in a reader."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def default_consumer_name(service: str) -> str:
    return f"{service}-{socket.gethostname()}-{os.getpid()}"


class StreamConsumer:
    """Reads one stream in one consumer group.

    ``handle_batch`` gets every entry read in one call (the fast path). If it raises, the entries are
    retried one by one with ``handle_one`` so a single bad entry cannot hold the others back.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        namespace: str,
        stream: str,
        group: str,
        consumer: str,
        handle_one: MessageHandler,
        handle_batch: BatchHandler | None = None,
        batch_size: int = 500,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        dlq_maxlen: int = 100_000,
        stall_seconds: float = 300.0,
        metrics: StreamMetrics | None = None,
        metrics_interval: float = GROUP_METRICS_SECONDS,
    ) -> None:
        self.redis = redis
        self.stream_name = stream
        self.stream = f"{namespace}:stream:{stream}"
        self.dlq = f"{self.stream}:dlq"
        self.group = group
        self.consumer = consumer
        self.handle_one = handle_one
        self.handle_batch = handle_batch
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.dlq_maxlen = dlq_maxlen
        self.processed = 0
        self.failed = 0
        self.dead_lettered = 0
        # Entries that were trimmed out of the stream while pending: acknowledged, their data gone.
        self.lost = 0
        self._last_reclaim = 0.0
        self.stall_seconds = stall_seconds
        self.last_step_at: float | None = None
        # (oldest pending id, when it was first seen there): a pending list whose head never moves is stuck.
        self._oldest_pending: tuple[str, float] | None = None
        self.metrics = metrics
        self.metrics_interval = metrics_interval
        self._metrics_at = -float("inf")

    @classmethod
    def configured(
        cls,
        redis: Redis,
        settings: Settings,
        *,
        stream: str,
        group: str,
        handle_one: MessageHandler,
        handle_batch: BatchHandler | None = None,
        consumer: str | None = None,
        batch_size: int | None = None,
        metrics: StreamMetrics | None = None,
    ) -> StreamConsumer:
        """A consumer with the deployment's stream settings (namespace, budgets, reclaim delay)."""
        return cls(
            redis,
            namespace=settings.redis_namespace,
            stream=stream,
            group=group,
            consumer=consumer or default_consumer_name(group),
            handle_one=handle_one,
            handle_batch=handle_batch,
            batch_size=batch_size or settings.stream_batch_size,
            claim_idle_ms=settings.stream_claim_idle_ms,
            max_deliveries=settings.stream_max_deliveries,
            dlq_maxlen=settings.stream_maxlen,
            stall_seconds=settings.stream_stall_seconds,
            metrics=metrics,
        )

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        """Reads until ``stop``. Redis outages are waited out here; anything else propagates to the
        supervisor, which logs it and starts the consumer again."""
        await self.ensure_group()
        log.info("consumer_started", stream=self.stream, group=self.group, consumer=self.consumer)
        try:
            await self._run(stop)
        except BaseException as exc:
            reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else f"{type(exc).__name__}: {exc}"
            log.info("consumer_stopped", stream=self.stream, group=self.group, consumer=self.consumer, reason=reason)
            raise
        log.info("consumer_stopped", stream=self.stream, group=self.group, consumer=self.consumer, reason="stopped")

    async def _run(self, stop: asyncio.Event) -> None:
        self.last_step_at = time.monotonic()
        outages = 0
        while not stop.is_set():
            try:
                await self.refresh_metrics()
                await self.step()
                self.last_step_at = time.monotonic()
                outages = 0
            except (RedisConnectionError, RedisTimeoutError, OSError, StoreUnavailable) as exc:
                outages += 1
                delay = jittered_backoff(outages, base=0.5, cap=10.0, jitter="equal")
                what = (
                    "consumer_store_unavailable" if isinstance(exc, StoreUnavailable) else "consumer_redis_unavailable"
                )
                log.warning(what, stream=self.stream, error=str(exc), retry_in=round(delay, 2))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The stream was deleted (e.g. FLUSHDB): recreate the group and go on.
                    await self.ensure_group()
                else:
                    raise

    async def refresh_metrics(self, *, force: bool = False) -> None:
        """Every ``metrics_interval`` (or now, when forced): the group's pending count and lag into the gauges,
        from one XINFO GROUPS."""
        if self.metrics is None or (not force and time.monotonic() - self._metrics_at < self.metrics_interval):
            return
        self._metrics_at = time.monotonic()
        try:
            groups = await self.redis.xinfo_groups(self.stream)
        except ResponseError:
            return  # the stream is gone (FLUSHDB): step() recreates it and the group
        labels = (self.stream_name, self.group)
        for info in groups:
            if decode_text(info["name"]) != self.group:
                continue
            self.metrics.pending.labels(*labels).set(int(info["pending"]))
            lag = info.get("lag")
            if lag is not None:
                self.metrics.lag.labels(*labels).set(int(lag))
            else:
                # Unknown (Redis 6.2 has no lag; 7.x gives none while deleted entries make it uncountable):
                # no sample rather than a stale or made-up one.
                with contextlib.suppress(KeyError):
                    self.metrics.lag.remove(*labels)

    def _count(self, outcome: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.processed.labels(self.stream_name, self.group, outcome).inc(n)

    async def stall_reason(self) -> str | None:
        """Why this consumer is not keeping up, or None: no read completed for ``stall_seconds``, or the
        group's oldest pending entry has not moved for that long."""
        now = time.monotonic()
        if self.last_step_at is not None and now - self.last_step_at > self.stall_seconds:
            return f"consumer {self.group} completed no read for {now - self.last_step_at:.0f}s"
        summary = await self.redis.xpending(self.stream, self.group)
        oldest = summary.get("min") if summary and summary.get("pending") else None
        if oldest is None:
            self._oldest_pending = None
            return None
        oldest_id = decode_text(oldest)
        if self._oldest_pending is None or self._oldest_pending[0] != oldest_id:
            self._oldest_pending = (oldest_id, now)
            return None
        stuck_for = now - self._oldest_pending[1]
        if stuck_for > self.stall_seconds:
            return (
                f"group {self.group} stalled: oldest pending entry {oldest_id} has not moved for {stuck_for:.0f}s "
                f"({summary['pending']} pending)"
            )
        return None

    async def step(self) -> int:
        """Reclaim stale entries when due, then read and handle one batch of new entries."""
        loop = asyncio.get_running_loop()
        handled = 0
        if loop.time() - self._last_reclaim >= max(self.claim_idle_ms / 1000 / 2, 0.05):
            self._last_reclaim = loop.time()
            handled += await self.reclaim()
        response = await self.redis.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=self.batch_size, block=self.block_ms
        )
        messages = [
            StreamMessage(id=decode_text(entry_id), fields={decode_text(k): decode_text(v) for k, v in fields.items()})
            for _stream, entries in response or []
            for entry_id, fields in entries
            if fields is not None
        ]
        if messages:
            await self._process(messages)
            handled += len(messages)
        return handled

    async def reclaim(self) -> int:
        """Claim entries idle past ``claim_idle_ms``; process those still within their delivery budget,
        dead-letter the rest, and acknowledge the ones trimmed out of the stream while pending.

        XPENDING (with IDLE) then XCLAIM rather than XAUTOCLAIM: the servers we support disagree about
        trimmed entries (Redis 6.2 replies with nil ids and keeps them pending for ever; 7.x drops them
        from the pending list and reports them in a third reply element that redis-py discards), while
        XCLAIM by id lets us tell "claimed", "claimed by someone else" and "gone" apart on every version.
        """
        idle = await self.redis.xpending_range(
            self.stream, self.group, min="-", max="+", count=self.batch_size, idle=self.claim_idle_ms
        )
        if not idle:
            return 0
        delivered_before = {decode_text(p["message_id"]): int(p["times_delivered"]) for p in idle}
        claimed = await self.redis.xclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms, message_ids=list(delivered_before)
        )
        live = {decode_text(i): f for i, f in claimed if i is not None and f is not None}
        missing = [entry_id for entry_id in delivered_before if entry_id not in live]
        if missing:
            await self._ack_trimmed(missing)
        messages: list[StreamMessage] = []
        for entry_id, fields in live.items():
            message = StreamMessage(
                id=entry_id,
                fields={decode_text(k): decode_text(v) for k, v in fields.items()},
                deliveries=delivered_before[entry_id] + 1,
            )
            if delivered_before[entry_id] >= self.max_deliveries:
                message.deliveries -= 1
                await self._dead_letter(message, f"failed {message.deliveries} deliveries")
            else:
                messages.append(message)
        if messages:
            log.info(
                "consumer_reclaimed", stream=self.stream, group=self.group, consumer=self.consumer, count=len(messages)
            )
            # One by one: a reclaimed entry has failed before, so isolate it from the others.
            for done, message in enumerate(messages):
                try:
                    await self._process_one(message)
                except StoreUnavailable:
                    # The claim counted a delivery for each of the rest too; none of them was tried.
                    await self._keep_budget(messages[done + 1 :])
                    raise
        return len(messages)

    async def _ack_trimmed(self, entry_ids: list[str]) -> None:
        """Of entries that XCLAIM did not return, acknowledge those no longer in the stream (trimmed away by
        MAXLEN while pending: their data is gone). Those still there were claimed by another consumer."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xrange(self.stream, min=entry_id, max=entry_id)
            found = await pipe.execute()
        gone = [entry_id for entry_id, rows in zip(entry_ids, found, strict=True) if not rows]
        if not gone:
            return
        await self.redis.xack(self.stream, self.group, *gone)
        self.lost += len(gone)
        self._count("lost", len(gone))
        log.error(
            "consumer_entries_lost",
            stream=self.stream,
            group=self.group,
            count=len(gone),
            first=gone[0],
            reason="trimmed from the stream (MAXLEN) before they were processed",
        )

    async def _process(self, messages: list[StreamMessage]) -> None:
        if self.handle_batch is not None and len(messages) > 1:
            try:
                await self.handle_batch(messages)
            except Exception as exc:
                if store_unavailable(exc):
                    # Not the entries' fault: leave them pending, unpenalised, and let run() back off.
                    await self._keep_budget(messages)
                    raise StoreUnavailable(str(exc)) from exc
                log.warning(
                    "consumer_batch_failed_retrying_singly",
                    stream=self.stream,
                    count=len(messages),
                    error=f"{type(exc).__name__}: {exc}",
                )
            else:
                await self.redis.xack(self.stream, self.group, *[m.id for m in messages])
                self.processed += len(messages)
                self._count("acked", len(messages))
                return
        for message in messages:
            await self._process_one(message)

    async def _process_one(self, message: StreamMessage) -> None:
        set_correlation_id(message.correlation_id)
        try:
            await self.handle_one(message)
        except PoisonMessage as exc:
            await self._dead_letter(message, str(exc))
        except (RedisConnectionError, RedisTimeoutError):
            raise
        except Exception as exc:
            if store_unavailable(exc):
                await self._keep_budget([message])
                raise StoreUnavailable(str(exc)) from exc
            # Left pending: reclaim retries it later and dead-letters it once its budget is spent.
            self.failed += 1
            self._count("failed")
            log.warning(
                "consumer_message_failed",
                stream=self.stream,
                entry_id=message.id,
                error=f"{type(exc).__name__}: {exc}",
            )
        else:
            await self.redis.xack(self.stream, self.group, message.id)
            self.processed += 1
            self._count("acked")
        finally:
            set_correlation_id(None)

    async def _keep_budget(self, messages: list[StreamMessage]) -> None:
        """An outage of a store the handler needs (PostgreSQL down) must not spend the entries' delivery
        budget, or a long outage would dead-letter perfectly good entries: put their counts back."""
        with contextlib.suppress(RedisError):
            async with self.redis.pipeline(transaction=False) as pipe:
                for message in messages:
                    pipe.xclaim(
                        self.stream, self.group, self.consumer, min_idle_time=0, message_ids=[message.id],
                        retrycount=max(message.deliveries - 1, 0), justid=True,
                    )  # fmt: skip
                await pipe.execute()

    async def _dead_letter(self, message: StreamMessage, reason: str) -> None:
        fields = dict(message.fields)
        fields.update(
            {
                "dlq_reason": reason[:500],
                "dlq_source_id": message.id,
                "dlq_group": self.group,
                "dlq_deliveries": str(message.deliveries),
            }
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dlq, fields, maxlen=self.dlq_maxlen, approximate=True)
            pipe.xack(self.stream, self.group, message.id)
            await pipe.execute()
        self.dead_lettered += 1
        self._count("dead_lettered")
        log.error(
            "consumer_dead_lettered", stream=self.stream, group=self.group, entry_id=message.id, reason=reason,
            dlq=self.dlq,
        )  # fmt: skip

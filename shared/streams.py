"""Redis Streams: a publisher and a consumer-group consumer.

Delivery is at least once. A consumer acks an entry only after its handler succeeded; entries left
pending by a consumer that died are claimed by another after ``claim_idle_ms`` (XAUTOCLAIM); an entry
delivered ``max_deliveries`` times without success, or one that can never succeed (``PoisonMessage``),
moves to the dead-letter stream ``<stream>:dlq`` and is acked so the rest keep flowing. Handlers must be
idempotent.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.logging import get_correlation_id, new_correlation_id, set_correlation_id
from shared.settings import Settings

log = structlog.get_logger("streams")

TICKS_STREAM = "ticks"
PRICES_STREAM = "prices"
# Email requests for the alerting service's sender: {"id", "to", "subject", "text"}.
EMAILS_STREAM = "emails"


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


BatchHandler = Callable[[list[StreamMessage]], Awaitable[None]]
MessageHandler = Callable[[StreamMessage], Awaitable[None]]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
    ) -> None:
        self.redis = redis
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
        self._last_reclaim = 0.0

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
        )

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_group()
        log.info("consumer_started", stream=self.stream, group=self.group, consumer=self.consumer)
        backoff = 0.5
        while not stop.is_set():
            try:
                await self.step()
                backoff = 0.5
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("consumer_redis_unavailable", stream=self.stream, error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # The stream was deleted (e.g. FLUSHDB): recreate the group and go on.
                    await self.ensure_group()
                else:
                    raise

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
            StreamMessage(id=_s(entry_id), fields={_s(k): _s(v) for k, v in fields.items()})
            for _stream, entries in response or []
            for entry_id, fields in entries
            if fields is not None
        ]
        if messages:
            await self._process(messages)
            handled += len(messages)
        return handled

    async def reclaim(self) -> int:
        """Claim entries idle past ``claim_idle_ms`` (XAUTOCLAIM); process those still within their delivery
        budget, dead-letter the rest."""
        claimed = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms, count=self.batch_size
        )
        entries = [(_s(i), f) for i, f in (claimed[1] if claimed else []) if i is not None]
        # Redis 6.2 returns entries trimmed away while pending with no fields; 7.x drops them from the
        # pending list itself. Either way nothing is left to process: just ack.
        gone = [entry_id for entry_id, fields in entries if fields is None]
        if gone:
            await self.redis.xack(self.stream, self.group, *gone)
        live = [(entry_id, fields) for entry_id, fields in entries if fields is not None]
        if not live:
            return 0
        # The claim counted as a delivery: an entry delivered more often than the budget allows has had
        # its max_deliveries attempts already.
        pending = await self.redis.xpending_range(
            self.stream, self.group, min=live[0][0], max=live[-1][0], count=len(live), consumername=self.consumer
        )
        deliveries = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
        messages: list[StreamMessage] = []
        for entry_id, fields in live:
            message = StreamMessage(
                id=entry_id,
                fields={_s(k): _s(v) for k, v in fields.items()},
                deliveries=deliveries.get(entry_id, 2),
            )
            if message.deliveries > self.max_deliveries:
                message.deliveries -= 1
                await self._dead_letter(message, f"failed {message.deliveries} deliveries")
            else:
                messages.append(message)
        if messages:
            log.info("consumer_reclaimed", stream=self.stream, count=len(messages))
            # One by one: a reclaimed entry has failed before, so isolate it from the others.
            for message in messages:
                await self._process_one(message)
        return len(messages)

    async def _process(self, messages: list[StreamMessage]) -> None:
        if self.handle_batch is not None and len(messages) > 1:
            try:
                await self.handle_batch(messages)
            except Exception as exc:
                log.warning(
                    "consumer_batch_failed_retrying_singly",
                    stream=self.stream,
                    count=len(messages),
                    error=f"{type(exc).__name__}: {exc}",
                )
            else:
                await self.redis.xack(self.stream, self.group, *[m.id for m in messages])
                self.processed += len(messages)
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
            # Left pending: reclaim retries it later and dead-letters it once its budget is spent.
            self.failed += 1
            log.warning(
                "consumer_message_failed",
                stream=self.stream,
                entry_id=message.id,
                error=f"{type(exc).__name__}: {exc}",
            )
        else:
            await self.redis.xack(self.stream, self.group, message.id)
            self.processed += 1
        finally:
            set_correlation_id(None)

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
        log.error("consumer_dead_lettered", stream=self.stream, entry_id=message.id, reason=reason, dlq=self.dlq)

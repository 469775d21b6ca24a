"""Publishing ticks so that a Redis outage costs no source its loop and loses no tick it can keep."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import structlog
from redis.exceptions import RedisError

from services.ingest.metrics import IngestMetrics
from shared.messages import TickMessage
from shared.sharding import tick_stream_of
from shared.streams import StreamPublisher

log = structlog.get_logger("ingest")

# Per source: a few minutes of a busy websocket feed. Past it the oldest ticks go first: a newer quote of
# the same pair supersedes them anyway.
MAX_HELD_TICKS = 20_000


class TickPublisher:
    """Publishes a source's ticks; while Redis refuses, holds them (bounded) and sends them first next time.

    Redelivered ticks are harmless: pricing stores them keyed by tick id.

    With ``shards`` > 1 (COINLYTICS_PRICING_SHARDS) each tick goes to its coin's pricing shard's stream,
    ``ticks.<shard_of(base)>``: all ticks of one coin reach one pricing replica, in the order read."""

    def __init__(
        self,
        publisher: StreamPublisher,
        source: str,
        max_held: int = MAX_HELD_TICKS,
        retry_seconds: float = 1.0,
        *,
        metrics: IngestMetrics | None = None,
        shards: int = 1,
    ) -> None:
        self.publisher = publisher
        self.source = source
        self.shards = shards
        # Counted here, the one place both runners publish through: what reached the stream, not what was read.
        self.published = metrics.ticks.labels(source) if metrics is not None else None
        self.held: deque[dict[str, Any]] = deque(maxlen=max_held)
        self.dropped = 0
        self.failures = 0
        # A busy websocket feed calls once per frame: while Redis is away, try at most this often.
        self.retry_seconds = retry_seconds
        self._failed_at: float | None = None

    async def publish(self, ticks: Sequence[TickMessage]) -> int | None:
        """How many ticks reached the stream (held ones included), or None when they are held for later."""
        if not ticks and not self.held:
            return 0
        before = len(self.held)
        new = [t.to_stream() for t in ticks]
        overflow = before + len(new) - (self.held.maxlen or 0)
        if overflow > 0:
            self.dropped += overflow
        self.held.extend(new)
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_seconds:
            return None
        batch = list(self.held)
        routed: dict[str, list[dict[str, Any]]] = {}
        for payload in batch:
            routed.setdefault(tick_stream_of(str(payload["base"]), self.shards), []).append(payload)
        sent: set[str] = set()
        try:
            for stream, payloads in routed.items():
                await self.publisher.publish_many(stream, payloads)
                sent.add(stream)
        except (RedisError, OSError) as exc:
            self.failures += 1
            self._failed_at = time.monotonic()
            if sent:
                # Keep only what did not go out: the streams that took theirs must not get them twice.
                kept = [p for stream, payloads in routed.items() if stream not in sent for p in payloads]
                self.held.clear()
                self.held.extend(kept)
                if self.published is not None:
                    self.published.inc(len(batch) - len(kept))
            log.warning(
                "ticks_held", source=self.source, held=len(self.held), dropped=self.dropped,
                error=f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
            return None
        self.held.clear()
        self._failed_at = None
        if self.published is not None:
            self.published.inc(len(batch))
        if before:
            log.info("held_ticks_published", source=self.source, count=before)
        return len(batch)

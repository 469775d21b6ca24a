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
from shared.streams import TICKS_STREAM, StreamPublisher

log = structlog.get_logger("ingest")

# Per source: a few minutes of a busy websocket feed. Past it the oldest ticks go first: a newer quote of
# the same pair supersedes them anyway.
MAX_HELD_TICKS = 20_000


class TickPublisher:
    """Publishes a source's ticks; while Redis refuses, holds them (bounded) and sends them first next time.

    Redelivered ticks are harmless: pricing stores them keyed by tick id."""

    def __init__(
        self,
        publisher: StreamPublisher,
        source: str,
        max_held: int = MAX_HELD_TICKS,
        retry_seconds: float = 1.0,
        *,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.publisher = publisher
        self.source = source
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
        try:
            await self.publisher.publish_many(TICKS_STREAM, batch)
        except (RedisError, OSError) as exc:
            self.failures += 1
            self._failed_at = time.monotonic()
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

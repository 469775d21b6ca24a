"""Publishing ticks so that a Redis outage costs no source its loop and loses no tick it can keep."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import structlog
from redis.exceptions import RedisError

from shared.messages import TickMessage
from shared.streams import TICKS_STREAM, StreamPublisher

log = structlog.get_logger("ingest")

# Per source: a few minutes of a busy websocket feed. Past it the oldest ticks go first: a newer quote of
# the same pair supersedes them anyway.
MAX_HELD_TICKS = 20_000


class TickPublisher:
    """Publishes a source's ticks; while Redis refuses, holds them (bounded) and sends them first next time.

    Redelivered ticks are harmless: pricing stores them keyed by tick id."""

    def __init__(self, publisher: StreamPublisher, source: str, max_held: int = MAX_HELD_TICKS) -> None:
        self.publisher = publisher
        self.source = source
        self.held: deque[dict[str, Any]] = deque(maxlen=max_held)
        self.dropped = 0
        self.failures = 0

    async def publish(self, ticks: Sequence[TickMessage]) -> bool:
        """True when everything (held and new) reached the stream."""
        if not ticks and not self.held:
            return True
        before = len(self.held)
        new = [t.to_stream() for t in ticks]
        if before + len(new) > (self.held.maxlen or 0):
            self.dropped += before + len(new) - (self.held.maxlen or 0)
        self.held.extend(new)
        batch = list(self.held)
        try:
            await self.publisher.publish_many(TICKS_STREAM, batch)
        except (RedisError, OSError) as exc:
            self.failures += 1
            log.warning(
                "ticks_held", source=self.source, held=len(self.held), dropped=self.dropped,
                error=f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
            return False
        self.held.clear()
        if before:
            log.info("held_ticks_published", source=self.source, count=before)
        return True

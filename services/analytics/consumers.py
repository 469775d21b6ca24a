"""Stream readers of the analytics service: each price event tells which coin just got a new candle, so the
cached results computed from that coin's candles can be dropped (services/analytics/service.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from redis.asyncio import Redis

from services.analytics.service import AnalyticsService
from shared.settings import Settings
from shared.streams import PRICES_STREAM, PoisonMessage, StreamConsumer, StreamMessage, StreamMetrics

GROUP = "analytics"


def _pair(message: StreamMessage) -> tuple[str, str, datetime]:
    payload = message.payload()
    base, vs, at = payload.get("base"), payload.get("vs"), payload.get("last_updated")
    if not isinstance(base, str) or not isinstance(vs, str) or not isinstance(at, str):
        raise PoisonMessage("price event without base, vs and last_updated")
    try:
        moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
    except ValueError:
        raise PoisonMessage(f"price event with an unreadable last_updated: {at[:40]!r}") from None
    return base, vs, moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def price_consumer(
    redis: Redis,
    settings: Settings,
    service: AnalyticsService,
    *,
    consumer: str | None = None,
    metrics: StreamMetrics | None = None,
) -> StreamConsumer:
    async def handle_one(message: StreamMessage) -> None:
        await service.new_candles([_pair(message)])

    async def handle_batch(messages: list[StreamMessage]) -> None:
        # The newest moment per pair is all that matters: one marker check per pair per batch.
        latest: dict[tuple[str, str], datetime] = {}
        for message in messages:
            base, vs, at = _pair(message)
            latest[(base, vs)] = max(at, latest.get((base, vs), at))
        await service.new_candles([(base, vs, at) for (base, vs), at in latest.items()])

    return StreamConsumer.configured(
        redis,
        settings,
        stream=PRICES_STREAM,
        group=GROUP,
        consumer=consumer,
        handle_one=handle_one,
        handle_batch=handle_batch,
        metrics=metrics,
    )

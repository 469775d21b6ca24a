"""Stream readers of the conversion service: consolidation events refresh the cached rate table."""

from __future__ import annotations

from redis.asyncio import Redis

from services.conversion.service import ConversionService
from shared.settings import Settings
from shared.streams import PRICES_STREAM, PoisonMessage, StreamConsumer, StreamMessage, StreamMetrics

GROUP = "conversion"


def _payload(message: StreamMessage) -> dict[str, object]:
    payload = message.payload()
    if not isinstance(payload.get("base"), str) or not isinstance(payload.get("vs"), str) or "price" not in payload:
        raise PoisonMessage("price event without base, vs and price")
    return payload


def price_consumer(
    redis: Redis,
    settings: Settings,
    service: ConversionService,
    *,
    consumer: str | None = None,
    metrics: StreamMetrics | None = None,
) -> StreamConsumer:
    async def handle_one(message: StreamMessage) -> None:
        await service.apply_prices([_payload(message)])
        await service.maybe_snapshot_on_change()

    async def handle_batch(messages: list[StreamMessage]) -> None:
        await service.apply_prices([_payload(m) for m in messages])
        await service.maybe_snapshot_on_change()

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

"""Stream readers of the pricing service."""

from __future__ import annotations

from redis.asyncio import Redis

from services.pricing.service import PricingService
from shared.messages import TickMessage
from shared.settings import Settings
from shared.streams import TICKS_STREAM, StreamConsumer, StreamMessage, StreamMetrics

GROUP = "pricing"


def tick_consumer(
    redis: Redis,
    settings: Settings,
    service: PricingService,
    *,
    consumer: str | None = None,
    metrics: StreamMetrics | None = None,
) -> StreamConsumer:
    async def handle_one(message: StreamMessage) -> None:
        await service.apply_ticks([TickMessage.from_json(message.fields.get("data"))])

    async def handle_batch(messages: list[StreamMessage]) -> None:
        # Any malformed entry raises PoisonMessage here; the consumer then retries one by one,
        # dead-lettering only that entry.
        await service.apply_ticks([TickMessage.from_json(m.fields.get("data")) for m in messages])

    return StreamConsumer.configured(
        redis,
        settings,
        stream=TICKS_STREAM,
        group=GROUP,
        consumer=consumer,
        handle_one=handle_one,
        handle_batch=handle_batch,
        metrics=metrics,
    )

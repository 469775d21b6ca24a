"""Stream readers of the pricing service."""

from __future__ import annotations

from redis.asyncio import Redis

from services.pricing.service import PricingService
from shared.messages import TickMessage
from shared.settings import Settings
from shared.streams import TICKS_STREAM, StreamConsumer, StreamMessage, default_consumer_name

GROUP = "pricing"


def tick_consumer(
    redis: Redis, settings: Settings, service: PricingService, *, consumer: str | None = None
) -> StreamConsumer:
    async def handle_one(message: StreamMessage) -> None:
        await service.apply_ticks([TickMessage.from_json(message.fields.get("data"))])

    async def handle_batch(messages: list[StreamMessage]) -> None:
        # Any malformed entry raises PoisonMessage here; the consumer then retries one by one,
        # dead-lettering only that entry.
        await service.apply_ticks([TickMessage.from_json(m.fields.get("data")) for m in messages])

    return StreamConsumer(
        redis,
        namespace=settings.redis_namespace,
        stream=TICKS_STREAM,
        group=GROUP,
        consumer=consumer or default_consumer_name("pricing"),
        handle_one=handle_one,
        handle_batch=handle_batch,
        batch_size=settings.stream_batch_size,
        claim_idle_ms=settings.stream_claim_idle_ms,
        max_deliveries=settings.stream_max_deliveries,
        dlq_maxlen=settings.stream_maxlen,
    )

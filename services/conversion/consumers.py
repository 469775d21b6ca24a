"""Stream readers of the conversion service: consolidation events refresh the cached rate table."""

from __future__ import annotations

from redis.asyncio import Redis

from services.conversion.service import ConversionService
from shared.settings import Settings
from shared.streams import PRICES_STREAM, PoisonMessage, StreamConsumer, StreamMessage, default_consumer_name

GROUP = "conversion"


def _payload(message: StreamMessage) -> dict[str, object]:
    payload = message.payload()
    if not isinstance(payload.get("base"), str) or not isinstance(payload.get("vs"), str) or "price" not in payload:
        raise PoisonMessage("price event without base, vs and price")
    return payload


def price_consumer(
    redis: Redis, settings: Settings, service: ConversionService, *, consumer: str | None = None
) -> StreamConsumer:
    async def handle_one(message: StreamMessage) -> None:
        await service.apply_prices([_payload(message)])
        await service.maybe_snapshot_on_change()

    async def handle_batch(messages: list[StreamMessage]) -> None:
        await service.apply_prices([_payload(m) for m in messages])
        await service.maybe_snapshot_on_change()

    return StreamConsumer(
        redis,
        namespace=settings.redis_namespace,
        stream=PRICES_STREAM,
        group=GROUP,
        consumer=consumer or default_consumer_name("conversion"),
        handle_one=handle_one,
        handle_batch=handle_batch,
        batch_size=settings.stream_batch_size,
        claim_idle_ms=settings.stream_claim_idle_ms,
        max_deliveries=settings.stream_max_deliveries,
        dlq_maxlen=settings.stream_maxlen,
    )

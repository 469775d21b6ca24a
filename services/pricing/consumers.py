"""Stream readers of the pricing service."""

from __future__ import annotations

from redis.asyncio import Redis

from services.pricing.service import PricingService
from shared.messages import TickMessage
from shared.settings import Settings
from shared.sharding import shard_of, ticks_stream
from shared.streams import PoisonMessage, StreamConsumer, StreamMessage, StreamMetrics, default_consumer_name

# The same group name on every shard's stream: each stream has exactly one reader group, its shard's.
GROUP = "pricing"


def tick_consumer(
    redis: Redis,
    settings: Settings,
    service: PricingService,
    *,
    consumer: str | None = None,
    metrics: StreamMetrics | None = None,
    shard: int | None = None,
) -> StreamConsumer:
    """The consumer of this replica's ticks: ``ticks`` with one shard, else ``ticks.<shard>`` (the replica's own
    index unless given). A replica never reads another shard's stream, so entries a stopped replica left pending
    wait for it (same index) instead of moving to a replica that does not own their coins."""
    shards = settings.pricing_shards
    index = settings.shard_index(shards) if shard is None else shard

    def owned_tick(message: StreamMessage) -> TickMessage:
        tick = TickMessage.from_json(message.fields.get("data"))
        if shards > 1 and shard_of(tick.base, shards) != index:
            # Only an ingest with another shard count puts it here; consolidating it would let two replicas
            # work on one coin. Dead-lettered (kept, with this reason) rather than applied.
            raise PoisonMessage(
                f"{tick.base} belongs to pricing shard {shard_of(tick.base, shards)} of {shards}, not {index}: "
                "ingest and pricing disagree on COINLYTICS_PRICING_SHARDS"
            )
        return tick

    async def handle_one(message: StreamMessage) -> None:
        await service.apply_ticks([owned_tick(message)])

    async def handle_batch(messages: list[StreamMessage]) -> None:
        # Any malformed or foreign entry raises PoisonMessage here; the consumer then retries one by one,
        # dead-lettering only that entry.
        await service.apply_ticks([owned_tick(m) for m in messages])

    return StreamConsumer.configured(
        redis,
        settings,
        stream=ticks_stream(index, shards),
        group=GROUP,
        # With shards the name carries the index, so XINFO CONSUMERS shows which replica holds what.
        consumer=consumer or default_consumer_name(GROUP if shards == 1 else f"{GROUP}.{index}"),
        handle_one=handle_one,
        handle_batch=handle_batch,
        metrics=metrics,
    )

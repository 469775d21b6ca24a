"""Stream readers of the gateway: activity other services report for the users' activity log, which the
gateway owns."""

from __future__ import annotations

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.gateway.activity import USER_ACTIVITY_STREAM, ActivityMessage
from services.gateway.auth import repository
from shared.db import transaction
from shared.settings import Settings
from shared.streams import StreamConsumer, StreamMessage, StreamMetrics

GROUP = "gateway-activity"


def activity_consumer(
    redis: Redis,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    *,
    consumer: str | None = None,
    metrics: StreamMetrics | None = None,
) -> StreamConsumer:
    async def handle_one(message: StreamMessage) -> None:
        activity = ActivityMessage.from_stream(message.payload())
        async with transaction(sessions) as session:
            await repository.add_activity_once(
                session,
                message_id=activity.id,
                user_id=activity.user_id,
                kind=activity.kind,
                client_address=activity.client_address,
                at=activity.at,
                details=activity.details,
            )

    return StreamConsumer.configured(
        redis, settings, stream=USER_ACTIVITY_STREAM, group=GROUP, consumer=consumer, handle_one=handle_one,
        batch_size=100, metrics=metrics,
    )  # fmt: skip

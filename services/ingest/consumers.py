"""Stream readers of the ingest service: failures other services' sources report, for the error log
that ingest owns."""

from __future__ import annotations

from datetime import datetime

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.ingest import repository
from shared.db import transaction
from shared.settings import Settings
from shared.streams import SOURCE_ERRORS_STREAM, PoisonMessage, StreamConsumer, StreamMessage, StreamMetrics

GROUP = "ingest-errors"


def source_error_consumer(
    redis: Redis,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    *,
    consumer: str | None = None,
    metrics: StreamMetrics | None = None,
) -> StreamConsumer:
    async def handle_one(message: StreamMessage) -> None:
        payload = message.payload()
        fields = {name: payload.get(name) for name in ("id", "source", "kind", "message", "at")}
        if not all(isinstance(v, str) and v for v in fields.values()):
            raise PoisonMessage("a source error needs non-empty id, source, kind, message and at")
        try:
            at = datetime.fromisoformat(str(fields["at"]).replace("Z", "+00:00"))
        except ValueError:
            raise PoisonMessage(f"'at' is not an ISO 8601 time: {fields['at']!r}") from None
        if at.tzinfo is None:
            raise PoisonMessage("'at' has no UTC offset")
        async with transaction(sessions) as session:
            await repository.record_reported_error(
                session,
                report_id=str(fields["id"]),
                source=str(fields["source"]),
                kind=str(fields["kind"]),
                message=str(fields["message"]),
                at=at,
            )

    return StreamConsumer.configured(
        redis, settings, stream=SOURCE_ERRORS_STREAM, group=GROUP, consumer=consumer, handle_one=handle_one,
        batch_size=100, metrics=metrics,
    )  # fmt: skip

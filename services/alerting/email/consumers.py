"""Reads email requests from the `emails` stream (published by the gateway after its commit) and sends them."""

from __future__ import annotations

import asyncio

import structlog
from redis.asyncio import Redis

from services.alerting.email.service import EmailSender, EmailUnconfigured
from shared.settings import Settings
from shared.streams import EMAILS_STREAM, PoisonMessage, StreamConsumer, StreamMessage, StreamMetrics

log = structlog.get_logger("alerting.email")
SENT_TTL_SECONDS = 7 * 24 * 3600


class EmailConsumer:
    def __init__(
        self, settings: Settings, redis: Redis, sender: EmailSender, *, metrics: StreamMetrics | None = None
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.sender = sender
        self.consumer = StreamConsumer.configured(
            redis, settings, stream=EMAILS_STREAM, group="alerting-email", handle_one=self.handle, batch_size=50,
            metrics=metrics,
        )  # fmt: skip

    async def handle(self, message: StreamMessage) -> None:
        payload = message.payload()
        fields = {name: payload.get(name) for name in ("id", "to", "subject", "text")}
        if not all(isinstance(v, str) and v for v in fields.values()):
            raise PoisonMessage("email request needs non-empty id, to, subject and text")
        email_id, to, subject, text = (str(fields[n]) for n in ("id", "to", "subject", "text"))
        # At-least-once delivery: a request already sent (redelivered after a crash) is not mailed twice.
        sent_key = self.settings.key("email", "sent", email_id)
        if await self.redis.exists(sent_key):
            return
        try:
            await self.sender.send(to, subject, text, message_id=email_id)
        except EmailUnconfigured:
            log.warning("channel unconfigured", channel="email", subject=subject)
            return
        await self.redis.set(sent_key, b"1", ex=SENT_TTL_SECONDS)
        log.info("email_sent", subject=subject)

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)

"""Delivering a stored alert event to one of its alert's channels: one attempt per job run.

The delivery row is the truth. A run that finds it finished (delivered, failed, disabled, skipped) does
nothing, so a job that runs twice (arq redelivers a job whose worker died) sends at most what is still owed.
An attempt is counted before the send, so a worker that dies mid-send still moves the schedule on. A transient
failure stores the next attempt time and raises arq's ``Retry`` with that delay (Standard Webhooks' schedule,
jittered; a 429's ``Retry-After`` when longer); past the schedule the delivery is ``failed``.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import structlog
from arq.worker import Retry
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.alerting import repository
from services.alerting.channels.mail import recipient_key, render_alert_email, send_alert_email, unsubscribe_token
from services.alerting.channels.outcome import Outcome
from services.alerting.channels.sms import SmsSender, sms_text
from services.alerting.channels.webhook import WebhookSender
from services.alerting.email.service import EmailSender
from services.alerting.evaluation import webhook_body
from services.alerting.service import UNSUBSCRIBE_PURPOSE, AlertService
from shared.db import transaction
from shared.settings import Settings

log = structlog.get_logger("alerting")

FINISHED = frozenset({"delivered", "failed", "disabled", "skipped"})
# Retry-After beyond this is not honoured as such: the schedule's own delay applies (a day at most).
MAX_RETRY_AFTER_SECONDS = 86_400.0
# An attempt's outcome as metrics and the system log name it, by the delivery status it left behind (a
# 410 Gone disables the channel).
ATTEMPT_OUTCOMES = {"delivered": "delivered", "retrying": "retrying", "failed": "failed", "disabled": "gone"}


@dataclass(frozen=True, slots=True)
class Attempt:
    event_id: uuid.UUID
    alert_id: uuid.UUID
    channel_index: int
    channel: dict[str, Any]
    payload: dict[str, Any]
    attempt: int


def retry_delay(settings: Settings, attempt: int, retry_after: float | None) -> float | None:
    """Seconds until the next attempt after ``attempt`` failed, or None when the schedule is spent."""
    schedule = settings.alert_retry_schedule
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * random.uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
    return delay


class DeliveryService:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        alerts: AlertService,
        email: EmailSender,
        *,
        webhook: WebhookSender | None = None,
        sms: SmsSender | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.alerts = alerts
        self.email = email
        self.webhook = webhook or WebhookSender(allow_private=settings.webhook_allow_private)
        self.sms = sms or SmsSender(settings.sms_url, settings.sms_from)
        self.unsubscribe_key = settings.purpose_key(UNSUBSCRIBE_PURPOSE)
        self.attempts = Counter(
            "alert_deliveries_total",
            "Alert delivery attempts by channel type and outcome (delivered, retrying, failed, gone)",
            ["channel", "outcome"],
            registry=registry,
        )

    async def start(self) -> None:
        await self.webhook.start()
        await self.sms.start()

    async def close(self) -> None:
        await self.webhook.close()
        await self.sms.close()

    async def deliver(self, event_id: uuid.UUID, channel_index: int) -> str:
        """One attempt; the delivery's status afterwards. Raises ``Retry`` for the next attempt."""
        attempt = await self._begin(event_id, channel_index)
        if isinstance(attempt, str):
            return attempt
        started = time.perf_counter()
        try:
            outcome = await self._send(attempt)
        except Exception as exc:
            # A bug or an unexpected library error: a transient failure like any other, never a lost event.
            log.exception("alert_delivery_error", event_id=str(event_id), channel=channel_index)
            outcome = Outcome("retry", f"{type(exc).__name__}: {exc}"[:300])
        return await self._finish(attempt, outcome, duration_ms=(time.perf_counter() - started) * 1000)

    async def _begin(self, event_id: uuid.UUID, channel_index: int) -> Attempt | str:
        now = datetime.now(UTC)
        async with transaction(self.sessions) as session:
            delivery = await repository.delivery_for_update(session, event_id, channel_index)
            if delivery is None:
                return "gone"  # the alert (and with it its events) was deleted
            if delivery.status in FINISHED:
                return delivery.status
            event = await repository.event_by_id(session, event_id)
            alert = await repository.alert_by_id(session, event.alert_id) if event is not None else None
            if event is None or alert is None:
                return "gone"
            channel = alert.channels[channel_index] if channel_index < len(alert.channels) else None
            if channel is None or channel.get("type") != delivery.type or channel.get("disabled"):
                delivery.status = "skipped"
                delivery.last_error = (
                    f"channel disabled: {channel.get('disabled_reason')}"
                    if channel is not None and channel.get("disabled")
                    else "the alert's channels changed before this was sent"
                )
                delivery.updated_at = now
                return "skipped"
            delivery.attempts += 1
            delivery.status = "retrying" if delivery.attempts > 1 else "pending"
            delivery.updated_at = now
            return Attempt(event.id, alert.id, channel_index, dict(channel), dict(event.payload), delivery.attempts)

    async def _send(self, attempt: Attempt) -> Outcome:
        channel = attempt.channel
        kind = channel["type"]
        if kind == "webhook":
            body = webhook_body(attempt.payload)
            return await self.webhook.send(channel["url"], channel["secret"], str(attempt.event_id), body)
        if kind == "sms":
            if not self.sms.configured:
                return Outcome("failed", "sms channel is not configured (COINLYTICS_SMS_URL)")
            return await self.sms.send(
                channel["to"], sms_text(attempt.payload), idempotency_key=f"{attempt.event_id}:{attempt.channel_index}"
            )
        if kind == "email":
            if not self.email.configured:
                return Outcome("failed", "email channel is not configured (COINLYTICS_SMTP_URL)")
            key = recipient_key(self.unsubscribe_key, channel["to"])
            token = unsubscribe_token(key, attempt.alert_id, attempt.channel_index)
            base = self.settings.public_url.rstrip("/")
            unsubscribe_url = f"{base}/api/v1/alerts/unsubscribe?token={quote(token)}"
            subject, text, html = render_alert_email(
                attempt.payload, unsubscribe_url=unsubscribe_url, alert_url=f"{base}/alerts/{attempt.alert_id}"
            )
            return await send_alert_email(
                self.email,
                channel["to"],
                subject,
                text,
                html,
                unsubscribe_url=unsubscribe_url,
                message_id=f"{attempt.event_id}.{attempt.channel_index}",
            )
        return Outcome("failed", f"unknown channel type {kind!r}")

    async def _finish(self, attempt: Attempt, outcome: Outcome, *, duration_ms: float = 0.0) -> str:
        now = datetime.now(UTC)
        delay: float | None = None
        disabled_alert = None
        async with transaction(self.sessions) as session:
            delivery = await repository.delivery_for_update(session, attempt.event_id, attempt.channel_index)
            if delivery is None:
                return "gone"
            delivery.updated_at = now
            delivery.last_error = outcome.detail if outcome.status != "delivered" else None
            if outcome.status == "delivered":
                delivery.status = "delivered"
                delivery.delivered_at = now
                delivery.next_attempt_at = None
            elif outcome.status == "gone":
                delivery.status = "disabled"
                delivery.next_attempt_at = None
                reason = f"the endpoint answered 410 Gone on {now.date().isoformat()}"
                disabled_alert = await repository.disable_channel(
                    session, attempt.alert_id, attempt.channel_index, reason
                )
            elif outcome.status == "failed":
                delivery.status = "failed"
                delivery.next_attempt_at = None
            else:
                delay = retry_delay(self.settings, attempt.attempt, outcome.retry_after)
                if delay is None:
                    delivery.status = "failed"
                    delivery.last_error = f"gave up after {attempt.attempt} attempts: {outcome.detail}"
                    delivery.next_attempt_at = None
                else:
                    delivery.status = "retrying"
                    delivery.next_attempt_at = now + timedelta(seconds=delay)
            status = delivery.status
        kind = str(attempt.channel["type"])
        result = ATTEMPT_OUTCOMES.get(status, status)
        self.attempts.labels(kind, result).inc()
        log.info(
            "alert_delivered",
            alert_id=str(attempt.alert_id),
            event_id=str(attempt.event_id),
            channel=kind,
            channel_index=attempt.channel_index,
            outcome=result,
            attempt=attempt.attempt,
            duration_ms=round(duration_ms, 3),
            status=status,
            detail=outcome.detail,
            retry_in=None if delay is None else round(delay, 1),
        )
        if disabled_alert is not None:
            await self.alerts.announce_channel_disabled(disabled_alert, attempt.channel_index, now)
        if delay is not None:
            raise Retry(defer=timedelta(seconds=delay))
        return status

"""The alerting service's app. Its public endpoints arrive with their issue; today it serves the
operations endpoints every service has, so the platform's shape is complete and supervised."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.alerting.email.consumers import EmailConsumer
from services.alerting.email.service import EmailSender
from shared.service_app import Resources, build_service_app
from shared.settings import Settings


@asynccontextmanager
async def email_channel(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
    """The email sender and its stream consumer (welcome, password-reset and alert mails)."""
    settings = resources.settings
    app.state.email_sender = EmailSender(settings.smtp_url, settings.smtp_from)
    emails = EmailConsumer(settings, resources.redis, app.state.email_sender)
    resources.supervisor.start("email-consumer", emails.run, check=emails.consumer.stall_reason)
    yield


def create_app(settings: Settings) -> FastAPI:
    return build_service_app(
        "alerting",
        settings,
        title="Coinlytics alerting",
        description="Alerting: threshold alerts delivered by webhook, email, SMS and live push.",
        routers=[],
        lifespan=email_channel,
    )

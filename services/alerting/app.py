"""The alerting service's app: the alerts API, the evaluator (the prices stream against every rule), the
delivery worker, the email channel's consumer, and the cleanup jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from services.alerting.api import router
from services.alerting.delivery import DeliveryService
from services.alerting.email.consumers import EmailConsumer
from services.alerting.email.service import EmailSender
from services.alerting.evaluation import DELIVERY_QUEUE, EvaluationService, evaluator_shard
from services.alerting.schemas import without_channels
from services.alerting.service import AlertService
from services.alerting.tasks import CRON_JOBS, DELIVERY_FUNCTIONS, DELIVERY_JOB_TIMEOUT, FUNCTIONS
from shared.jobs import JobQueue, supervise_worker
from shared.service_app import Resources, build_service_app
from shared.settings import Settings


@asynccontextmanager
async def email_channel(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
    """The email sender and its stream consumer (welcome, password-reset and alert mails)."""
    settings = resources.settings
    app.state.email_sender = EmailSender(settings.smtp_url, settings.smtp_from)
    emails = EmailConsumer(settings, resources.redis, app.state.email_sender, metrics=resources.stream_metrics)
    resources.supervisor.start("email-consumer", emails.run, check=emails.consumer.stall_reason)
    yield


@asynccontextmanager
async def lifespan(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
    settings = resources.settings
    alerts = AlertService(settings, resources.sessions, resources.redis, resources.publisher)
    app.state.alerts = alerts
    jobs = JobQueue(settings)
    app.state.evaluation = EvaluationService(
        settings, resources.sessions, resources.redis, resources.publisher, jobs,
        registry=resources.registry, stream_metrics=resources.stream_metrics,
    )  # fmt: skip
    async with email_channel(app, resources):
        delivery = DeliveryService(
            settings, resources.sessions, alerts, app.state.email_sender, registry=resources.registry
        )
        await delivery.start()
        ctx = {
            "settings": settings,
            "sessions": resources.sessions,
            "alerts": alerts,
            "jobs": jobs,
            "delivery": delivery,
        }
        supervise_worker(resources.supervisor, settings, "alerting", functions=FUNCTIONS, cron_jobs=CRON_JOBS, ctx=ctx)
        # Sends wait on the network, not the CPU: many at once, each bounded by its channel's timeout.
        supervise_worker(
            resources.supervisor,
            settings,
            DELIVERY_QUEUE,
            functions=DELIVERY_FUNCTIONS,
            ctx=ctx,
            max_jobs=50,
            job_timeout=DELIVERY_JOB_TIMEOUT,
            # An alert is only as fast as its delivery job is picked up: a poll is one cheap ZRANGEBYSCORE.
            poll_delay=0.005,
        )
        evaluation = app.state.evaluation
        resources.supervisor.start("alert-evaluator", evaluation.run, check=evaluation.stall_reason)
        try:
            yield
        finally:
            await delivery.close()
            await jobs.close()


def create_app(settings: Settings) -> FastAPI:
    # Resolved before anything starts, so a bad COINLYTICS_SHARD stops the process with its message.
    evaluator_shard(settings)
    app = build_service_app(
        "alerting",
        settings,
        title="Coinlytics alerting",
        description="Alerting: threshold alerts delivered by webhook, email, SMS and live push.",
        routers=[router],
        lifespan=lifespan,
    )
    unconfigured = {name for name, url in (("email", settings.smtp_url), ("sms", settings.sms_url)) if not url}
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # An unconfigured channel is refused (422); the spec says so by not offering it.
        first = app.openapi_schema is None
        spec = generate()
        return without_channels(spec, unconfigured) if first else spec

    app.openapi = openapi  # type: ignore[method-assign]
    return app

"""The conversion service's app: its lifespan owns the rate table, the prices-stream consumer and the
scheduled jobs (ECB rates, rate snapshots)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from services.conversion.api import router
from services.conversion.consumers import price_consumer
from services.conversion.service import ConversionService
from services.conversion.tasks import (
    CRON_JOBS,
    FUNCTIONS,
    SOURCE,
    fiat_source,
    refresh_fiat_rates,
    startup_refresh_needed,
)
from shared.jobs import supervise_worker
from shared.service_app import Resources, build_service_app
from shared.settings import Settings

log = structlog.get_logger("conversion")


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
        service = ConversionService(settings, sessions=resources.sessions, redis=resources.redis)
        app.state.conversion = service
        await service.rebuild()
        consumer = price_consumer(resources.redis, settings, service, metrics=resources.stream_metrics)
        app.state.price_consumer = consumer
        resources.supervisor.start("price-consumer", consumer.run, check=consumer.stall_reason)
        startup: asyncio.Task[None] | None = None
        if fiat_source(settings) is not None:
            # One-off, not supervised: the cron job is what keeps the rates current.
            startup = asyncio.create_task(_startup_ecb(settings, resources, service), name="ecb-startup")
        ctx = {"settings": settings, "sessions": resources.sessions, "redis": resources.redis, "service": service}
        supervise_worker(
            resources.supervisor, settings, "conversion", functions=FUNCTIONS, cron_jobs=CRON_JOBS, ctx=ctx
        )
        log.info("conversion_ready", ecb="ecb" in settings.sources, fiat_source=fiat_source(settings))
        try:
            yield
        finally:
            if startup is not None and not startup.done():
                startup.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await startup

    return build_service_app(
        "conversion",
        settings,
        title="Coinlytics conversion",
        description="Conversions between any crypto and fiat currency, now and at any past moment.",
        routers=[router],
        lifespan=lifespan,
    )


async def _startup_ecb(settings: Settings, resources: Resources, service: ConversionService) -> None:
    """Runs the fiat job once at startup when stored rates are missing or stale, without delaying startup."""
    try:
        if await startup_refresh_needed(resources.sessions, fiat_source(settings) or SOURCE):
            await refresh_fiat_rates(settings, resources.sessions, resources.redis, service)
    except Exception as exc:  # a failed first fetch must not stop the service; the cron job retries
        log.error("source_failed", source=fiat_source(settings), kind="startup", reason=f"{type(exc).__name__}: {exc}")

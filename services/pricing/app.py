"""The pricing service's app: its lifespan owns the tick consumer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from services.pricing import repository
from services.pricing.api import router
from services.pricing.coins.api import admin_router as coins_admin_router
from services.pricing.coins.api import router as coins_router
from services.pricing.coins.service import CoinsService
from services.pricing.consumers import tick_consumer
from services.pricing.history import tasks as history_tasks
from services.pricing.history.api import router as history_router
from services.pricing.history.service import HistoryService
from services.pricing.service import PriceCache, PricingService
from shared.db import transaction
from shared.errors import store_unavailable
from shared.jobs import supervise_worker
from shared.service_app import Resources, build_service_app
from shared.settings import Settings

log = structlog.get_logger("pricing")


async def refresh_loop(service: PricingService, resources: Resources, stop: asyncio.Event) -> None:
    """Re-evaluates every tracked coin on a timer, so a source that falls silent ages out and the
    price turns stale even when no new tick arrives to trigger consolidation."""
    interval = resources.settings.consolidation_refresh_seconds
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        if stop.is_set():
            return
        try:
            async with transaction(resources.sessions) as session:
                symbols = await repository.tracked_symbols(session)
            await service.refresh(symbols)
        except Exception as exc:
            store = store_unavailable(exc)
            if store is None:
                raise  # a bug, not an outage: the supervisor logs the traceback, counts it, restarts the loop
            log.warning("freshness_refresh_failed", store=store, error=f"{type(exc).__name__}: {exc}")


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
        coins = CoinsService(settings, sessions=resources.sessions)
        service = PricingService(
            settings,
            sessions=resources.sessions,
            publisher=resources.publisher,
            cache=PriceCache(resources.redis, settings),
            coins=coins,
            registry=resources.registry,
        )
        app.state.pricing = service
        app.state.coins = coins
        app.state.history = HistoryService(resources.sessions, vs_currencies=settings.vs_currencies)
        async with transaction(resources.sessions) as session:
            await repository.seed_coins(session, settings.coins)
        consumer = tick_consumer(resources.redis, settings, service, metrics=resources.stream_metrics)
        app.state.tick_consumer = consumer
        supervisor = resources.supervisor
        supervisor.start("tick-consumer", consumer.run, check=consumer.stall_reason)
        supervisor.start("freshness-refresh", lambda stop: refresh_loop(service, resources, stop))
        supervisor.start("price-outbox", service.relay_outbox, check=service.outbox_stall)
        supervise_worker(
            supervisor,
            settings,
            "pricing",
            cron_jobs=history_tasks.cron_jobs(),
            ctx=history_tasks.job_context(settings, resources.sessions),
        )
        log.info("pricing_ready", coins=settings.coins, min_fresh_sources=settings.min_fresh_sources)
        yield

    return build_service_app(
        "pricing",
        settings,
        title="Coinlytics pricing",
        description="Consolidated prices from many sources.",
        routers=[router, coins_router, coins_admin_router, history_router],
        lifespan=lifespan,
    )

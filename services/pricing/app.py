"""The pricing service's app: its lifespan owns the tick consumer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from services.pricing import repository
from services.pricing.api import router
from services.pricing.consumers import tick_consumer
from services.pricing.service import PriceCache, PricingService
from shared.db import transaction
from shared.service_app import Resources, build_service_app
from shared.settings import Settings

log = structlog.get_logger("pricing")


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
        service = PricingService(
            settings,
            sessions=resources.sessions,
            publisher=resources.publisher,
            cache=PriceCache(resources.redis, settings),
        )
        app.state.pricing = service
        async with transaction(resources.sessions) as session:
            await repository.seed_coins(session, settings.coins)
        consumer = tick_consumer(resources.redis, settings, service)
        app.state.tick_consumer = consumer
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(stop), name="tick-consumer")
        log.info("pricing_ready", coins=settings.coins, min_fresh_sources=settings.min_fresh_sources)
        try:
            yield
        finally:
            stop.set()
            try:
                await asyncio.wait_for(task, timeout=5)
            except TimeoutError:
                task.cancel()

    return build_service_app(
        "pricing",
        settings,
        title="Coinlytics pricing",
        description="Consolidated prices from many sources.",
        routers=[router],
        lifespan=lifespan,
    )

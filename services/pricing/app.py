"""The pricing service's app: its lifespan owns the tick consumer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
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
from shared.sharding import owned
from shared.streams import StreamConsumer

log = structlog.get_logger("pricing")


async def refresh_loop(service: PricingService, resources: Resources, stop: asyncio.Event, *, shard: int = 0) -> None:
    """Re-evaluates every tracked coin this replica's shard owns on a timer, so a source that falls silent
    ages out and the price turns stale even when no new tick arrives to trigger consolidation. Another shard's
    coins are that shard's: refreshing them here would consolidate one coin in two processes at once."""
    interval = resources.settings.consolidation_refresh_seconds
    shards = resources.settings.pricing_shards
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        if stop.is_set():
            return
        try:
            async with transaction(resources.sessions) as session:
                symbols = await repository.tracked_symbols(session)
            await service.refresh(owned(symbols, shard, shards))
        except Exception as exc:
            store = store_unavailable(exc)
            if store is None:
                raise  # a bug, not an outage: the supervisor logs the traceback, counts it, restarts the loop
            log.warning("freshness_refresh_failed", store=store, error=f"{type(exc).__name__}: {exc}")


def stall_check(consumer: StreamConsumer) -> Callable[[], Awaitable[str | None]]:
    """The tick consumer's readiness check, naming the stream: with shards, /readyz says whose group it is."""

    async def check() -> str | None:
        reason = await consumer.stall_reason()
        return None if reason is None else f"{consumer.stream_name}: {reason}"

    return check


def create_app(settings: Settings) -> FastAPI:
    # Resolved before anything starts, so a bad COINLYTICS_SHARD stops the process with its message.
    shard = settings.shard_index(settings.pricing_shards)

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
        consumer = tick_consumer(resources.redis, settings, service, metrics=resources.stream_metrics, shard=shard)
        app.state.tick_consumer = consumer
        app.state.shard = shard
        supervisor = resources.supervisor
        supervisor.start("tick-consumer", consumer.run, check=stall_check(consumer))
        supervisor.start("freshness-refresh", lambda stop: refresh_loop(service, resources, stop, shard=shard))
        supervisor.start("price-outbox", service.relay_outbox, check=service.outbox_stall)
        # Price reads answer from a copy the prices stream keeps current (services/pricing/service.py PriceMemo).
        supervisor.start("price-memo", service.cache.memo.run)
        supervise_worker(
            supervisor,
            settings,
            "pricing",
            cron_jobs=history_tasks.cron_jobs(),
            ctx=history_tasks.job_context(settings, resources.sessions),
        )
        log.info(
            "pricing_ready", coins=owned(settings.coins, shard, settings.pricing_shards),
            min_fresh_sources=settings.min_fresh_sources, shard=shard, shards=settings.pricing_shards,
            stream=consumer.stream_name,
        )  # fmt: skip
        yield

    return build_service_app(
        "pricing",
        settings,
        title="Coinlytics pricing",
        description="Consolidated prices from many sources.",
        routers=[router, coins_router, coins_admin_router, history_router],
        lifespan=lifespan,
    )

"""The analytics service's app: comparisons, statistics and charts from the stored candles, and the
consumer that drops cached results as new candles land."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.analytics.api import router
from services.analytics.consumers import price_consumer
from services.analytics.service import AnalyticsService
from shared.service_app import Resources, build_service_app
from shared.settings import Settings


@asynccontextmanager
async def lifespan(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
    service = AnalyticsService(resources.settings, resources.sessions, resources.redis)
    app.state.analytics = service
    consumer = price_consumer(resources.redis, resources.settings, service, metrics=resources.stream_metrics)
    resources.supervisor.start("price-consumer", consumer.run, check=consumer.stall_reason)
    yield


def create_app(settings: Settings) -> FastAPI:
    return build_service_app(
        "analytics",
        settings,
        title="Coinlytics analytics",
        description="Analytics: comparisons, statistics, anomalies and charts.",
        routers=[router],
        lifespan=lifespan,
    )

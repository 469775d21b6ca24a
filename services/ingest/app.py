"""The ingest service's app: its lifespan owns the source runners."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.ingest import tasks as ingest_tasks
from services.ingest.api import router
from services.ingest.coingecko.tasks import coingecko_jobs
from services.ingest.consumers import source_error_consumer
from services.ingest.metrics import IngestMetrics
from services.ingest.service import IngestService
from shared.jobs import supervise_worker
from shared.service_app import Resources, build_service_app
from shared.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
        service = IngestService(
            settings,
            redis=resources.redis,
            publisher=resources.publisher,
            sessions=resources.sessions,
            metrics=IngestMetrics(resources.registry),
        )
        app.state.ingest = service
        await service.start(resources.supervisor)
        errors = source_error_consumer(resources.redis, settings, resources.sessions, metrics=resources.stream_metrics)
        resources.supervisor.start("source-error-consumer", errors.run, check=errors.stall_reason)
        async with coingecko_jobs(settings, resources) as coingecko:
            supervise_worker(
                resources.supervisor,
                settings,
                "ingest",
                cron_jobs=[*coingecko.cron_jobs, *ingest_tasks.cron_jobs()],
                ctx={**coingecko.ctx, "settings": settings, "sessions": resources.sessions},
            )
            yield

    return build_service_app(
        "ingest",
        settings,
        title="Coinlytics ingest",
        description="Collects quotes from exchanges and publishes normalised ticks.",
        routers=[router],
        lifespan=lifespan,
    )

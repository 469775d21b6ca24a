"""The ingest service's app: its lifespan owns the source runners."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.ingest.api import router
from services.ingest.coingecko.tasks import coingecko_jobs
from services.ingest.service import IngestService
from shared.jobs import run_worker
from shared.service_app import Resources, build_service_app
from shared.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
        service = IngestService(
            settings, redis=resources.redis, publisher=resources.publisher, sessions=resources.sessions
        )
        app.state.ingest = service
        await service.start()
        try:
            async with contextlib.AsyncExitStack() as jobs:
                coingecko = await jobs.enter_async_context(coingecko_jobs(settings, resources))
                if coingecko.cron_jobs:  # arq refuses a worker with nothing to run
                    await jobs.enter_async_context(
                        run_worker(settings, "ingest", cron_jobs=coingecko.cron_jobs, ctx=coingecko.ctx)
                    )
                yield
        finally:
            await service.stop()

    return build_service_app(
        "ingest",
        settings,
        title="Coinlytics ingest",
        description="Collects quotes from exchanges and publishes normalised ticks.",
        routers=[router],
        lifespan=lifespan,
    )

"""The gateway's app: its lifespan owns the connection pool to the internal services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.gateway.api import router
from services.gateway.service import Upstreams
from shared.service_app import Resources, build_service_app
from shared.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
        app.state.upstreams = Upstreams(settings)
        try:
            yield
        finally:
            await app.state.upstreams.close()

    return build_service_app(
        "gateway",
        settings,
        title="Coinlytics API",
        description="The public API of Coinlytics.",
        routers=[router],
        lifespan=lifespan,
        serve_docs=False,
    )

"""The arq cron job that refreshes CoinGecko market data, and what the ingest lifespan needs to run it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from arq.cron import CronJob, cron

from services.ingest.coingecko.client import CoinGeckoClient
from services.ingest.coingecko.service import SOURCE, CoinGeckoRefresher
from shared.service_app import Resources
from shared.settings import Settings

# Every 10 minutes: see the rate budget in services/ingest/coingecko/__init__.py. The market cap
# served by /api/v1/coins follows our own price between refreshes (supply x price), so a slower
# refresh costs little freshness.
REFRESH_MINUTES = 10
CTX_KEY = "coingecko"


async def refresh_coingecko(ctx: dict[str, Any]) -> dict[str, Any]:
    refresher: CoinGeckoRefresher = ctx[CTX_KEY]
    result = await refresher.run()
    return {"status": result.status, "updated": result.updated, "missing": result.missing, "error": result.error}


@dataclass
class CoinGeckoJobs:
    cron_jobs: list[CronJob] = field(default_factory=list)
    ctx: dict[str, Any] = field(default_factory=dict)


def cron_jobs() -> list[CronJob]:
    return [
        cron(
            refresh_coingecko,
            name="coingecko_refresh",
            minute=set(range(0, 60, REFRESH_MINUTES)),
            second=7,  # off the top of the minute, when every other scheduled client calls
            run_at_startup=True,
            timeout=120,
            max_tries=1,  # a failed run is retried by the next schedule, after the backoff, not at once
        )
    ]


@asynccontextmanager
async def coingecko_jobs(settings: Settings, resources: Resources) -> AsyncIterator[CoinGeckoJobs]:
    """The cron job and its worker context when "coingecko" is an enabled source, else nothing."""
    if SOURCE not in settings.sources:
        yield CoinGeckoJobs()
        return
    refresher = CoinGeckoRefresher(
        settings,
        sessions=resources.sessions,
        redis=resources.redis,
        client=CoinGeckoClient(settings.source_url(SOURCE, "rest"), timeout_seconds=settings.source_timeout_seconds),
    )
    await refresher.start()
    try:
        yield CoinGeckoJobs(cron_jobs=cron_jobs(), ctx={CTX_KEY: refresher})
    finally:
        await refresher.close()

"""The CoinGecko refresh: market cap, supply, name and CoinGecko id of every active tracked coin."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.ingest import repository as ingest_repository
from services.ingest.coingecko import repository
from services.ingest.coingecko.client import MAX_IDS_PER_CALL, CoinGeckoClient, CoinGeckoError, MarketRow
from services.pricing.coins.repository import active_coins, coins_seeded
from shared.backoff import jittered_backoff
from shared.db import transaction
from shared.settings import Settings
from shared.source_health import SourceHealth, SourceState, health_key, save_health

log = structlog.get_logger("ingest.coingecko")

SOURCE = "coingecko"
# CoinGecko ids of the default coins: a ticker is not unique on CoinGecko, so these are fixed rather
# than looked up (a lookup answers the top-ranked coin using the ticker, which is usually but not
# always the one meant).
KNOWN_IDS: dict[str, str] = {
    "BTC": "bitcoin",
    "ETH": "ethereum",
    "SOL": "solana",
    "XRP": "ripple",
    "ADA": "cardano",
    "DOGE": "dogecoin",
    "LTC": "litecoin",
    "DOT": "polkadot",
    "LINK": "chainlink",
    "AVAX": "avalanche-2",
}
BASE_BACKOFF_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 3600.0
# A symbol CoinGecko's lookup did not know is not asked for again before this.
UNKNOWN_SYMBOL_TTL_SECONDS = 86_400
# Two runs closer than this (restart loops, several ingest replicas) make the later one a no-op.
MIN_RUN_SPACING_SECONDS = 60.0


@dataclass
class RunResult:
    status: str  # ok, partial, failed, skipped, disabled
    updated: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    error: str | None = None
    calls: int = 0


def backoff_delay(failures: int, retry_after: float | None) -> float:
    """Exponential backoff with jitter; a server's Retry-After is honoured as the minimum."""
    delay = jittered_backoff(failures, base=BASE_BACKOFF_SECONDS, cap=MAX_BACKOFF_SECONDS, jitter="equal")
    if retry_after is not None:
        # A little jitter on top so replicas told the same Retry-After do not return in lockstep.
        delay = retry_after + random.uniform(0, min(30.0, retry_after / 10))
    return delay


def pick_by_symbol(rows: Sequence[MarketRow], symbols: Sequence[str]) -> dict[str, MarketRow]:
    """The best-ranked coin per requested ticker (several coins may share one)."""
    wanted = set(symbols)
    best: dict[str, MarketRow] = {}
    for row in rows:
        if row.symbol not in wanted:
            continue
        current = best.get(row.symbol)
        rank = row.market_cap_rank or math.inf
        if current is None or rank < (current.market_cap_rank or math.inf):
            best[row.symbol] = row
    return best


class CoinGeckoRefresher:
    def __init__(
        self,
        settings: Settings,
        *,
        sessions: async_sessionmaker[AsyncSession],
        redis: Redis,
        client: CoinGeckoClient,
        known_ids: dict[str, str] | None = None,
        min_run_spacing: float = MIN_RUN_SPACING_SECONDS,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.redis = redis
        self.client = client
        self.known_ids = KNOWN_IDS if known_ids is None else known_ids
        self.min_run_spacing = min_run_spacing
        self.health = SourceHealth(name=SOURCE, kind="scheduled", state=SourceState.SCHEDULED)
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return SOURCE in self.settings.sources

    def _key(self, *parts: str) -> str:
        return self.settings.key(SOURCE, *parts)

    async def start(self) -> None:
        """Publish the job's state before its first run (replaces ingest's placeholder entry)."""
        remaining = await self._backoff_remaining()
        if remaining:
            self.health.state = SourceState.BACKING_OFF
            self.health.backoff_seconds = remaining
        await self._save_health()

    async def close(self) -> None:
        await self.client.close()

    async def run(self) -> RunResult:
        """One refresh. Never raises: a failure is logged, counted and backed off from."""
        try:
            return await self._run()
        except Exception as exc:  # the database or Redis may fail too; the job must not crash the worker
            log.exception("coingecko_run_failed", source=SOURCE)
            failure = CoinGeckoError("unexpected", f"{type(exc).__name__}: {exc}")
            try:
                await self._failed(failure)
            except Exception as inner:
                log.warning("coingecko_failure_not_recorded", error=str(inner))
            return RunResult(status="failed", error=str(failure))

    async def _run(self) -> RunResult:
        if not self.enabled:
            return RunResult(status="disabled")
        remaining = await self._backoff_remaining()
        if remaining:
            log.info("coingecko_skipped", reason="backing off", retry_in=round(remaining, 1))
            self.health.backoff_seconds = remaining
            await self._save_health()
            return RunResult(status="skipped", error=f"backing off for {remaining:.0f}s")
        if self.min_run_spacing > 0 and not await self.redis.set(
            self._key("run"), datetime.now(UTC).isoformat(), nx=True, ex=max(1, math.ceil(self.min_run_spacing))
        ):
            return RunResult(status="skipped", error="another run happened moments ago")

        async with transaction(self.sessions) as session:
            # Sorted: CoinGecko is asked for the coins in a stable order whatever order they were added in.
            symbols, seeded = sorted(await active_coins(session)), await coins_seeded(session)
            if not seeded:
                # Pricing seeds the coins table at its start; until then the configured coins are tracked.
                symbols = list(self.settings.coins)
            ids = {**await repository.stored_ids(session, symbols)}
        ids.update({s: self.known_ids[s] for s in symbols if s in self.known_ids})
        resolved = {s: ids[s] for s in symbols if s in ids}
        unresolved = [s for s in symbols if s not in resolved and not await self._known_unknown(s)]

        calls_before = self.client.calls
        found: dict[str, MarketRow] = {}
        failure: CoinGeckoError | None = None
        by_id: dict[str, list[str]] = {}
        for symbol, coin_id in resolved.items():
            by_id.setdefault(coin_id, []).append(symbol)
        id_list = list(by_id)
        newly_unknown: list[str] = []
        try:
            for start in range(0, len(id_list), MAX_IDS_PER_CALL):
                for row in await self.client.markets(ids=id_list[start : start + MAX_IDS_PER_CALL]):
                    for symbol in by_id.get(row.id, []):
                        found[symbol] = row
            for start in range(0, len(unresolved), MAX_IDS_PER_CALL):
                chunk = unresolved[start : start + MAX_IDS_PER_CALL]
                matches = pick_by_symbol(await self.client.markets(symbols=chunk), chunk)
                found.update(matches)
                newly_unknown.extend(s for s in chunk if s not in matches)
        except CoinGeckoError as exc:
            failure = exc

        now = datetime.now(UTC)
        rows: list[dict[str, str | Decimal | datetime | None]] = [
            {
                "symbol": symbol,
                "coingecko_id": row.id,
                "name": row.name,
                "market_cap_usd": row.market_cap_usd,
                "circulating_supply": row.circulating_supply,
                "total_supply": row.total_supply,
                "updated_at": now,
            }
            for symbol, row in sorted(found.items())
        ]
        if rows:
            async with transaction(self.sessions) as session:
                await repository.upsert_market_data(session, rows)
        for symbol in newly_unknown:
            await self.redis.set(self._key("unknown", symbol), now.isoformat(), ex=UNKNOWN_SYMBOL_TTL_SECONDS)
        missing = [s for s in symbols if s not in found]
        result = RunResult(status="ok", updated=sorted(found), missing=missing, calls=self.client.calls - calls_before)
        self.health.messages_total += len(found)
        self.health.rate_window.append((time.monotonic(), len(found)))
        if failure is not None:
            await self._failed(failure)
            result.status = "partial" if found else "failed"
            result.error = str(failure)
            return result
        self.failures = 0
        self.health.connected()
        self.health.last_message_at = now.isoformat()
        await self._save_health()
        lost = [s for s in missing if s in resolved or s in newly_unknown]
        if lost:
            await self._record_error("missing_coin", f"no CoinGecko market data for: {', '.join(lost)}")
        log.info("coingecko_refreshed", updated=len(found), missing=missing, calls=result.calls)
        return result

    async def _known_unknown(self, symbol: str) -> bool:
        return bool(await self.redis.exists(self._key("unknown", symbol)))

    async def _backoff_remaining(self) -> float:
        ttl_ms = await self.redis.pttl(self._key("not_before"))
        return ttl_ms / 1000 if ttl_ms and ttl_ms > 0 else 0.0

    async def _failed(self, exc: CoinGeckoError) -> None:
        self.failures += 1
        delay = backoff_delay(self.failures, exc.retry_after)
        # Kept in Redis so a restart or another replica does not call before the deadline either.
        await self.redis.set(self._key("not_before"), datetime.now(UTC).isoformat(), px=max(1, int(delay * 1000)))
        state = SourceState.RATE_LIMITED if exc.kind == "rate_limited" else SourceState.DOWN
        self.health.failed(exc.kind, str(exc), state=state, backoff_seconds=delay)
        log.warning("source_failed", source=SOURCE, kind=exc.kind, reason=str(exc), retry_in=round(delay, 1))
        await self._record_error(exc.kind, str(exc))
        await self._save_health()

    async def _record_error(self, kind: str, message: str) -> None:
        await ingest_repository.log_source_error(self.sessions, source=SOURCE, kind=kind, message=message)

    async def _save_health(self) -> None:
        await save_health(self.redis, health_key(self.settings, SOURCE), self.health)

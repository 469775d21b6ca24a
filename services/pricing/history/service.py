"""History logic: candles from consolidated prices, interval choice, range checks, reads, roll-ups.

Candles are built from the consolidated price, not from trades: ``open``/``close`` are the first/last
consolidated price in the bucket by time and ``high``/``low`` its extremes. Their ``volume`` is null,
because sources only report a rolling 24h volume and the difference of two rolling windows is not the
volume traded in between. Candles loaded from an exchange (backfill) carry that exchange's volume.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.pricing.history import repository
from shared.db import delete_in_batches, transaction
from shared.errors import UnknownCurrency, UnknownSymbol, ValidationFailed
from shared.timeparse import iso_z

INTERVAL_SECONDS: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14_400, "1d": 86_400}
INTERVAL_CHOICES = (*INTERVAL_SECONDS, "auto")
# Intervals kept as rows; the others are aggregated from the finest stored one that divides them.
STORED_INTERVALS = ("1m", "1h", "1d")
LIVE_SOURCE = "consolidated"
ROLLUP_SOURCE = "rollup"
# A response never carries more candles than this (about 1 MB of JSON).
MAX_POINTS = 10_000
DEFAULT_RANGE = timedelta(days=1)
AUTO_FALLBACK = {"5m": "1h", "1h": "1d"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PricePoint(Protocol):
    """What the hook needs of a consolidation result (``services.pricing.service.Consolidated``)."""

    base: str
    vs: str
    price: Decimal
    last_updated: datetime


@dataclass(slots=True)
class MinuteCandle:
    base: str
    vs: str
    t: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    first_ts: datetime
    last_ts: datetime

    def add(self, ts: datetime, price: Decimal) -> None:
        if ts < self.first_ts:
            self.first_ts, self.open = ts, price
        if ts > self.last_ts:
            self.last_ts, self.close = ts, price
        self.high = max(self.high, price)
        self.low = min(self.low, price)

    def row(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "vs": self.vs,
            "interval": "1m",
            "t": self.t,
            "open": self.open,
            "high": self.high,
            "low": self.low,
            "close": self.close,
            "volume": None,
            "source": LIVE_SOURCE,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
        }


def floor_time(ts: datetime, seconds: int) -> datetime:
    """Start of the ``seconds``-long bucket holding ``ts``, buckets aligned on the Unix epoch (UTC)."""
    offset = (ts.astimezone(UTC) - EPOCH) // timedelta(seconds=seconds)
    return EPOCH + timedelta(seconds=offset * seconds)


def ceil_time(ts: datetime, seconds: int) -> datetime:
    floor = floor_time(ts, seconds)
    return floor if floor == ts else floor + timedelta(seconds=seconds)


def minute_candles(points: Iterable[PricePoint]) -> list[MinuteCandle]:
    """Merge consolidated prices into one candle per coin, currency and minute (by the price's time)."""
    candles: dict[tuple[str, str, datetime], MinuteCandle] = {}
    for p in points:
        ts = p.last_updated.astimezone(UTC)
        key = (p.base, p.vs, floor_time(ts, 60))
        found = candles.get(key)
        if found is None:
            candles[key] = MinuteCandle(p.base, p.vs, key[2], p.price, p.price, p.price, p.price, ts, ts)
        else:
            found.add(ts, p.price)
    return list(candles.values())


async def record_consolidated(session: AsyncSession, results: Iterable[PricePoint]) -> None:
    """Hook called by pricing inside the transaction that stores consolidated prices.

    Each price lands in its minute's candle at the time of its newest quote; a price seen again (a
    replay, or a re-consolidation with nothing new) changes nothing."""
    rows = [c.row() for c in minute_candles(results)]
    if rows:
        await repository.upsert_live_candles(session, rows)


def choose_interval(start: datetime, end: datetime) -> str:
    """CoinGecko's granularity rule: about 5-minute data up to a day, hourly up to 90 days, daily beyond."""
    span = end - start
    if span <= timedelta(days=1):
        return "5m"
    if span <= timedelta(days=90):
        return "1h"
    return "1d"


@dataclass(slots=True)
class HistoryQuery:
    base: str
    vs: str
    start: datetime
    end: datetime
    interval: str
    auto: bool = False

    @property
    def step(self) -> int:
        return INTERVAL_SECONDS[self.interval]


def plan_query(
    symbol: str,
    vs: str,
    start: datetime | None,
    end: datetime | None,
    interval: str,
    *,
    now: datetime,
    max_points: int = MAX_POINTS,
    default_range: timedelta = DEFAULT_RANGE,
) -> HistoryQuery:
    """Validate a history request; raises ValidationFailed with a message that says what to change."""
    if interval not in INTERVAL_CHOICES:
        raise ValidationFailed(
            f"interval: {interval!r} is not one of {', '.join(INTERVAL_CHOICES)}",
            details={"allowed": list(INTERVAL_CHOICES)},
        )
    end = end or now
    start = start or end - default_range
    if start >= end:
        raise ValidationFailed(
            f"start ({iso_z(start)}) must be before end ({iso_z(end)})",
            details={"start": iso_z(start), "end": iso_z(end)},
        )
    chosen = choose_interval(start, end) if interval == "auto" else interval
    query = HistoryQuery(symbol, vs, start, end, chosen, auto=interval == "auto")
    points = (ceil_time(end, query.step) - floor_time(start, query.step)) // timedelta(seconds=query.step)
    if points > max_points:
        span = (end - start).total_seconds()
        coarser = [i for i, s in INTERVAL_SECONDS.items() if s > query.step and span / s < max_points]
        hint = f"; use interval={coarser[0]} or a shorter range" if coarser else "; use a shorter range"
        raise ValidationFailed(
            f"range too long for interval {chosen}: {points} candles, at most {max_points} per request{hint}",
            details={"interval": chosen, "points": points, "max_points": max_points},
        )
    return query


class HistoryService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, vs_currencies: Sequence[str]) -> None:
        self.sessions = sessions
        self.vs_currencies = tuple(vs_currencies)

    async def candles(self, query: HistoryQuery) -> list[dict[str, Any]]:
        """Every candle of ``query.interval`` whose period overlaps [start, end), oldest first.

        With ``auto``, a range that has nothing at the chosen interval (e.g. only daily candles were
        backfilled) is served at the next coarser one that has data; ``query.interval`` says which."""
        async with transaction(self.sessions) as session:
            while True:
                lo, hi = floor_time(query.start, query.step), ceil_time(query.end, query.step)
                rows = await repository.read_candles(session, query.base, query.vs, query.interval, lo, hi)
                coarser = AUTO_FALLBACK.get(query.interval)
                if rows or not query.auto or coarser is None:
                    break
                query.interval = coarser
            if not rows:
                await self._check_known(session, query.base, query.vs)
        return rows

    async def _check_known(self, session: AsyncSession, base: str, vs: str) -> None:
        # Only asked when nothing was found, so a normal read costs one query.
        if not await repository.symbol_known(session, base):
            raise UnknownSymbol(f"unknown coin: {base}", details={"unknown": [base]})
        if vs not in self.vs_currencies and not await repository.currency_known(session, vs):
            raise UnknownCurrency(f"unknown currency: {vs}", details={"unknown": [vs]})


async def roll_up(sessions: async_sessionmaker[AsyncSession], now: datetime) -> dict[str, int]:
    """Materialise the hourly and daily candles of complete hours/days from the finer rows."""
    async with transaction(sessions) as session:
        hours = await repository.roll_up(session, "1h", "1m", until=floor_time(now, 3600))
    async with transaction(sessions) as session:
        days = await repository.roll_up(session, "1d", "1h", until=floor_time(now, 86_400))
    return {"1h": hours, "1d": days}


async def enforce_retention(
    sessions: async_sessionmaker[AsyncSession],
    now: datetime,
    *,
    ticks_hours: float,
    candles_1m_days: float,
    batch: int = 5000,
) -> dict[str, int]:
    """Delete raw ticks and 1-minute candles past their age, in batches of short transactions.

    Hourly and daily candles are rolled up first, so what the 1-minute rows said survives them."""
    await roll_up(sessions, now)
    return {
        "ticks": await delete_in_batches(
            sessions, repository.delete_ticks_before, now - timedelta(hours=ticks_hours), batch
        ),
        "candles_1m": await delete_in_batches(
            sessions, repository.delete_minute_candles_before, now - timedelta(days=candles_1m_days), batch
        ),
    }

"""All SQL of the coins endpoints (tracked coins, their market data, and price history lookups).

Pricing owns the ``coins`` table (its only writer). Other services read it only through
``active_coins`` and ``coins_seeded``."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import case, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.ingest.coingecko.repository import coingecko_id as coingecko_id
from services.ingest.coingecko.repository import market_data as market_data
from shared.models import Candle, Coin, CoinMarketData, Price, SourceQuote

CANDLE_LENGTHS = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}


async def active_coins(session: AsyncSession) -> list[str]:
    """The tracked coins, for every service: oldest first, so an ingest source's symbol order stays stable
    as coins are added. Read-only."""
    result = await session.scalars(
        select(Coin.symbol).where(Coin.active.is_(True)).order_by(Coin.added_at, Coin.symbol)
    )
    return list(result.all())


async def coins_seeded(session: AsyncSession) -> bool:
    """Whether pricing has seeded the coins table yet (any row, active or not). Read-only."""
    return await session.scalar(select(Coin.symbol).limit(1)) is not None


async def active_coins_with_data(session: AsyncSession) -> list[tuple[Coin, CoinMarketData | None]]:
    coins = list((await session.scalars(select(Coin).where(Coin.active.is_(True)).order_by(Coin.symbol))).all())
    return await _with_market_data(session, coins)


async def all_coins(session: AsyncSession) -> list[tuple[Coin, CoinMarketData | None]]:
    coins = list((await session.scalars(select(Coin).order_by(Coin.symbol))).all())
    return await _with_market_data(session, coins)


async def coin_with_data(session: AsyncSession, symbol: str) -> tuple[Coin, CoinMarketData | None] | None:
    coin = await session.get(Coin, symbol)
    if coin is None:
        return None
    return (await _with_market_data(session, [coin]))[0]


async def _with_market_data(session: AsyncSession, coins: list[Coin]) -> list[tuple[Coin, CoinMarketData | None]]:
    # CoinGecko's data belongs to ingest: read through its repository, not joined here.
    data = await market_data(session, [c.symbol for c in coins])
    return [(coin, data.get(coin.symbol)) for coin in coins]


async def prices(session: AsyncSession, bases: Sequence[str], vs: Sequence[str]) -> dict[tuple[str, str], Price]:
    if not bases or not vs:
        return {}
    result = await session.scalars(select(Price).where(Price.base.in_(list(bases)), Price.vs.in_(list(vs))))
    return {(p.base, p.vs): p for p in result.all()}


async def currency_known(session: AsyncSession, vs: str) -> bool:
    found = await session.scalar(select(Price.vs).where(Price.vs == vs).limit(1))
    return found is not None


async def closes_near(
    session: AsyncSession, bases: Sequence[str], vs: str, target: datetime, tolerance: timedelta
) -> dict[str, tuple[Decimal, datetime]]:
    """Per coin, the candle close observed nearest to ``target`` (at most ``tolerance`` away).

    A candle's close is the price at the candle's end (``t`` + its length), so that is the moment
    compared with ``target``. On a tie the finer candle wins."""
    if not bases:
        return {}
    length = case(
        *((Candle.interval == name, span) for name, span in CANDLE_LENGTHS.items()),
        else_=CANDLE_LENGTHS["1d"],
    )
    closed_at = (Candle.t + length).label("closed_at")
    fineness = case({"1m": 0, "1h": 1, "1d": 2}, value=Candle.interval, else_=3)
    lo, hi = target - tolerance, target + tolerance
    stmt = (
        select(Candle.base, Candle.close, closed_at)
        .distinct(Candle.base)
        .where(
            Candle.base.in_(list(bases)),
            Candle.vs == vs,
            Candle.interval.in_(list(CANDLE_LENGTHS)),
            # Bounds on ``t`` itself keep the primary-key index usable; the exact test is on the close time.
            Candle.t >= lo - max(CANDLE_LENGTHS.values()),
            Candle.t <= hi,
            Candle.t + length >= lo,
            Candle.t + length <= hi,
        )
        .order_by(Candle.base, func.abs(func.extract("epoch", Candle.t + length - target)), fineness)
    )
    result = await session.execute(stmt)
    return {base: (close, at) for base, close, at in result.tuples().all()}


async def source_quotes(session: AsyncSession, base: str) -> list[SourceQuote]:
    result = await session.scalars(
        select(SourceQuote).where(SourceQuote.base == base).order_by(SourceQuote.quote, SourceQuote.source)
    )
    return list(result.all())


async def lock_coin(session: AsyncSession, symbol: str) -> Coin | None:
    """The coin's row, locked until commit so concurrent admin changes apply one after the other."""
    return await session.get(Coin, symbol, with_for_update=True, populate_existing=True)


async def insert_coin(session: AsyncSession, symbol: str, name: str | None) -> bool:
    """Adds an active coin; False when the symbol already exists (a concurrent add cannot fail either)."""
    stmt = (
        insert(Coin)
        .values(symbol=symbol, name=name, active=True)
        .on_conflict_do_nothing(index_elements=[Coin.symbol])
        .returning(Coin.symbol)
    )
    return (await session.execute(stmt)).scalar() is not None

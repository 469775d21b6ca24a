"""All SQL of the CoinGecko job."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from shared.models import CoinMarketData


async def stored_ids(session: AsyncSession, symbols: Sequence[str]) -> dict[str, str]:
    if not symbols:
        return {}
    result = await session.execute(
        select(CoinMarketData.symbol, CoinMarketData.coingecko_id).where(
            CoinMarketData.symbol.in_(list(symbols)), CoinMarketData.coingecko_id.is_not(None)
        )
    )
    return {symbol: coin_id for symbol, coin_id in result.all() if coin_id}


async def upsert_market_data(
    session: AsyncSession,
    rows: Sequence[dict[str, str | Decimal | datetime | None]],
) -> None:
    """One row per symbol; a replayed or repeated run just writes the same values again."""
    if not rows:
        return
    stmt = insert(CoinMarketData).values(list(rows))
    stmt = stmt.on_conflict_do_update(
        index_elements=[CoinMarketData.symbol],
        set_={c: stmt.excluded[c] for c in rows[0] if c != "symbol"},
    )
    await session.execute(stmt)


# -- Read by other services (pricing's coins endpoints): the owner's read-only functions, imported from here. --


async def market_data(session: AsyncSession, symbols: Sequence[str]) -> dict[str, CoinMarketData]:
    """The stored CoinGecko data of these coins, by symbol (coins without any are absent)."""
    if not symbols:
        return {}
    result = await session.scalars(select(CoinMarketData).where(CoinMarketData.symbol.in_(list(symbols))))
    return {row.symbol: row for row in result.all()}


async def coingecko_id(session: AsyncSession, symbol: str) -> str | None:
    return await session.scalar(select(CoinMarketData.coingecko_id).where(CoinMarketData.symbol == symbol))

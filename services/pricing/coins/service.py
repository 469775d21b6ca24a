"""Tracked coins: the market overview (price, market cap, volume, changes from our own history) and
the admin operations that add or remove coins at runtime.

Market cap in ``vs`` = CoinGecko's circulating supply x our consolidated price in ``vs``: the same
definition CoinGecko uses, but with our fresher price, so it moves with every consolidation and
needs no fiat table. When the supply is unknown, CoinGecko's USD market cap is restated in ``vs``
by the ratio of our own prices (price in vs / price in USD).

Changes compare the current price with the close of our own candles nearest to now - 1 h / 24 h /
7 d (a candle's close is the price at its end); no candle within the tolerance gives null.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.pricing.coins import repository
from shared.db import transaction
from shared.errors import UnknownCurrency, UnknownSymbol
from shared.messages import status_at
from shared.models import Coin, CoinMarketData, Price
from shared.settings import Settings
from shared.timeparse import iso_z

# (field, how far back, how far the close may be from that moment)
CHANGE_WINDOWS: tuple[tuple[str, timedelta, timedelta], ...] = (
    ("change_1h_pct", timedelta(hours=1), timedelta(minutes=5)),
    ("change_24h_pct", timedelta(hours=24), timedelta(hours=1)),
    ("change_7d_pct", timedelta(days=7), timedelta(hours=6)),
)
PCT_QUANTUM = Decimal("0.0001")
CAP_QUANTUM = Decimal("0.01")
METHOD_SUPPLY = "circulating_supply x price"
METHOD_CONVERTED = "coingecko market_cap_usd x (price / price_usd)"


def pct_change(now_price: Decimal, then_price: Decimal) -> Decimal | None:
    if then_price <= 0:
        return None
    return ((now_price - then_price) / then_price * 100).quantize(PCT_QUANTUM, rounding=ROUND_HALF_EVEN)


def market_cap(
    data: CoinMarketData | None, price: Decimal | None, price_usd: Decimal | None
) -> tuple[Decimal | None, str | None]:
    if data is None:
        return None, None
    if data.circulating_supply is not None and data.circulating_supply > 0 and price is not None:
        return (data.circulating_supply * price).quantize(CAP_QUANTUM), METHOD_SUPPLY
    if data.market_cap_usd is not None and price is not None and price_usd is not None and price_usd > 0:
        converted = data.market_cap_usd * price / price_usd
        return converted.quantize(CAP_QUANTUM), METHOD_CONVERTED
    return None, None


@dataclass
class CoinView:
    coin: Coin
    data: CoinMarketData | None
    price: Price | None
    market_cap: Decimal | None
    market_cap_method: str | None

    def summary(self) -> dict[str, Any]:
        return {
            "symbol": self.coin.symbol,
            "name": self.coin.name or (self.data.name if self.data else None),
            "price": self.price.price if self.price else None,
            "market_cap": self.market_cap,
            "volume_24h": self.price.volume_24h if self.price else None,
            "change_1h_pct": None,
            "change_24h_pct": None,
            "change_7d_pct": None,
            "last_updated": iso_z(self.price.last_updated) if self.price else None,
            "price_status": status_at(self.price.status, self.price.fresh_until, datetime.now(UTC))
            if self.price
            else None,
        }


def admin_view(coin: Coin, coingecko_id: str | None, change: str | None = None) -> dict[str, Any]:
    return {
        "symbol": coin.symbol,
        "name": coin.name,
        "active": coin.active,
        "added_at": iso_z(coin.added_at),
        "coingecko_id": coingecko_id,
        "change": change,
    }


class CoinsService:
    def __init__(self, settings: Settings, *, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.settings = settings
        self.sessions = sessions

    async def _check_currency(self, session: AsyncSession, vs: str) -> None:
        if vs in self.settings.vs_currencies or await repository.currency_known(session, vs):
            return
        raise UnknownCurrency(
            f"unknown currency: {vs}; prices are published in {', '.join(self.settings.vs_currencies)}",
            details={"unknown": [vs]},
        )

    async def _views(
        self, session: AsyncSession, rows: list[tuple[Coin, CoinMarketData | None]], vs: str
    ) -> list[CoinView]:
        symbols = [coin.symbol for coin, _ in rows]
        found = await repository.prices(session, symbols, sorted({vs, "USD"}))
        views = []
        for coin, data in rows:
            price = found.get((coin.symbol, vs))
            usd = found.get((coin.symbol, "USD"))
            cap, method = market_cap(data, price.price if price else None, usd.price if usd else None)
            views.append(CoinView(coin=coin, data=data, price=price, market_cap=cap, market_cap_method=method))
        return views

    async def price_extras(
        self, prices: dict[tuple[str, str], Decimal], extras: Collection[str]
    ) -> dict[tuple[str, str], dict[str, Decimal | None]]:
        """``market_cap`` and ``change_24h`` (percent) for /api/v1/prices, by the definitions of
        /api/v1/coins, for the given (coin, currency) -> current price."""
        now = datetime.now(UTC)
        out: dict[tuple[str, str], dict[str, Decimal | None]] = {key: {} for key in prices}
        bases = sorted({base for base, _ in prices})
        async with transaction(self.sessions) as session:
            if "market_cap" in extras:
                data = await repository.market_data(session, bases)
                usd = {b: p.price for (b, _), p in (await repository.prices(session, bases, ["USD"])).items()}
                for (base, vs), price in prices.items():
                    usd_price = prices.get((base, "USD"), usd.get(base))
                    out[(base, vs)]["market_cap"] = market_cap(data.get(base), price, usd_price)[0]
            if "change_24h" in extras:
                _, back, tolerance = next(w for w in CHANGE_WINDOWS if w[0] == "change_24h_pct")
                for vs in sorted({vs for _, vs in prices}):
                    closes = await repository.closes_near(session, bases, vs, now - back, tolerance)
                    for base in bases:
                        if (base, vs) in prices:
                            then = closes.get(base)
                            change = pct_change(prices[(base, vs)], then[0]) if then is not None else None
                            out[(base, vs)]["change_24h"] = change
        return out

    async def _add_changes(self, session: AsyncSession, entries: list[dict[str, Any]], vs: str, now: datetime) -> None:
        priced = [e["symbol"] for e in entries if e["price"] is not None]
        for field, back, tolerance in CHANGE_WINDOWS:
            closes = await repository.closes_near(session, priced, vs, now - back, tolerance)
            for entry in entries:
                then = closes.get(entry["symbol"])
                if then is not None and entry["price"] is not None:
                    entry[field] = pct_change(entry["price"], then[0])

    async def list_coins(self, vs: str, page: int, per_page: int) -> tuple[list[dict[str, Any]], int]:
        """One page of the active coins, by market cap (largest first, unknown last), then symbol."""
        now = datetime.now(UTC)
        async with transaction(self.sessions) as session:
            await self._check_currency(session, vs)
            views = await self._views(session, await repository.active_coins_with_data(session), vs)
            views.sort(key=lambda v: (v.market_cap is None, -(v.market_cap or 0), v.coin.symbol))
            chunk = views[(page - 1) * per_page : page * per_page]
            entries = [v.summary() for v in chunk]
            await self._add_changes(session, entries, vs, now)
        return entries, len(views)

    async def coin_detail(self, symbol: str, vs: str) -> dict[str, Any]:
        now = datetime.now(UTC)
        async with transaction(self.sessions) as session:
            found = await repository.coin_with_data(session, symbol)
            if found is None or not found[0].active:
                raise UnknownSymbol(f"unknown coin: {symbol} (not tracked)", details={"unknown": [symbol]})
            await self._check_currency(session, vs)
            view = (await self._views(session, [found], vs))[0]
            entry = view.summary()
            await self._add_changes(session, [entry], vs, now)
            quotes = await repository.source_quotes(session, symbol)
        data = view.data
        entry.update(
            {
                "vs": vs,
                "coingecko_id": data.coingecko_id if data else None,
                "circulating_supply": data.circulating_supply if data else None,
                "total_supply": data.total_supply if data else None,
                "market_cap_method": view.market_cap_method,
                "market_data_updated_at": iso_z(data.updated_at) if data else None,
                "sources_used": sorted({q.source for q in quotes if q.status == "used"}),
                "sources": [
                    {
                        "source": q.source,
                        "pair": q.pair,
                        "quote": q.quote,
                        "price": q.price,
                        "volume_24h": q.volume_24h,
                        "timestamp": iso_z(q.exchange_ts),
                        "status": q.status,
                    }
                    for q in quotes
                ],
            }
        )
        return entry

    # --- admin ---------------------------------------------------------------------------------

    async def admin_list(self) -> list[dict[str, Any]]:
        async with transaction(self.sessions) as session:
            rows = await repository.all_coins(session)
        return [admin_view(coin, data.coingecko_id if data else None) for coin, data in rows]

    async def add_coin(self, symbol: str, name: str | None) -> dict[str, Any]:
        """Adds a coin or reactivates a removed one; ``change`` says which (or ``unchanged``)."""
        async with transaction(self.sessions) as session:
            created = await repository.insert_coin(session, symbol, name)
            coin = await repository.lock_coin(session, symbol)
            assert coin is not None  # inserted or already present, and never deleted
            change = "added" if created else "unchanged"
            if not created and not coin.active:
                coin.active = True
                change = "reactivated"
            if name is not None and coin.name != name:
                coin.name = name
            await session.flush()
            view = admin_view(coin, await repository.coingecko_id(session, symbol), change)
        return view

    async def remove_coin(self, symbol: str) -> dict[str, Any]:
        """Deactivates a coin (its history stays); unknown symbols are a 404."""
        async with transaction(self.sessions) as session:
            coin = await repository.lock_coin(session, symbol)
            if coin is None:
                raise UnknownSymbol(f"unknown coin: {symbol}", details={"unknown": [symbol]})
            change = "deactivated" if coin.active else "unchanged"
            coin.active = False
            await session.flush()
            view = admin_view(coin, await repository.coingecko_id(session, symbol), change)
        return view

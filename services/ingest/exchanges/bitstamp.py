"""Bitstamp (REST polling only).

Markets: ccxt reads /api/v2/markets/, which is not recorded. We call ccxt's own GET
/api/v2/trading-pairs-info/ (recorded 2022), rename its fields to the markets/ shape and hand them to ccxt's
fetch_markets through its cache. Tickers one by one, GET /api/v2/ticker/{pair}/ (the all-pairs
/api/v2/ticker/ is not recorded)."""

from __future__ import annotations

from typing import Any

from services.ingest.exchanges.base import CcxtCall, ExchangeProfile, Venue
from services.ingest.sources import SourceError


def markets_rows(rows: list[Any]) -> list[dict[str, Any]]:
    """Bitstamp's trading-pairs-info rows renamed to the /api/v2/markets/ fields ccxt parses. Only names change:
    ``name`` "BTC/USD" gives the two currencies, ``url_symbol`` is the market id; every row there is spot."""
    result = []
    for row in rows:
        if not isinstance(row, dict) or "/" not in str(row.get("name", "")):
            continue
        base, _, quote = str(row["name"]).partition("/")
        result.append({
            "name": row["name"], "market_symbol": row.get("url_symbol"), "base_currency": base,
            "counter_currency": quote, "base_decimals": row.get("base_decimals"),
            "counter_decimals": row.get("counter_decimals"), "trading": row.get("trading"),
            "instant_and_market_orders": row.get("instant_and_market_orders"),
            "description": row.get("description"), "market_type": "SPOT",
        })  # fmt: skip
    return result


async def _prime_markets(exchange: Any, call: CcxtCall) -> None:
    rows = await call(exchange.publicGetTradingPairsInfo)
    if not isinstance(rows, list):
        raise SourceError("bad_response", "bitstamp trading-pairs-info is not a list")
    # ccxt's fetch_markets reads its cached markets/ response when one is present and not expired.
    exchange.options["fetchMarkets"] = {
        **exchange.options.get("fetchMarkets", {}),
        "response": markets_rows(rows),
        "timestamp": exchange.milliseconds(),
        "expires": None,
    }


VENUE = Venue(
    name="bitstamp",
    profile=ExchangeProfile("bitstamp", tickers="single", prime_markets=_prime_markets),
    rate_limit="8000 requests per 10 minutes per IP; ccxt's limiter",
)

"""KuCoin (REST polling only).

Markets: ccxt reads /api/v2/symbols, which is not recorded; its ``versions`` option points it at
/api/v1/symbols (recorded 2021, the same fields ccxt reads). Tickers in one batch, GET
/api/v1/market/allTickers (weight 15, once per poll)."""

from __future__ import annotations

from services.ingest.exchanges.base import ExchangeProfile, Venue

VENUE = Venue(
    name="kucoin",
    profile=ExchangeProfile(
        "kucoin",
        tickers="batch",
        options={
            "versions": {"public": {"GET": {"symbols": "v1"}}},
            # Fees come from a second allTickers call on load; quotes do not need them.
            "fetchMarkets": {"fetchTickersFees": False},
        },
    ),
    rate_limit="public pool of request weight per 30 s; ccxt's weight costs",
)

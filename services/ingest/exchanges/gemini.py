"""Gemini (REST polling only).

Markets: ``fetch_markets_from_api``, GET /v1/symbols (recorded 2021; ids parsed by ccxt, the per-symbol
details are not fetched), not ccxt's default scrape of the docs site. Tickers one by one, GET
/v1/pubticker/{symbol} (ccxt's ``fetchTickerV1``)."""

from __future__ import annotations

from services.ingest.exchanges.base import ExchangeProfile, Venue

VENUE = Venue(
    name="gemini",
    profile=ExchangeProfile(
        "gemini",
        tickers="single",
        options={"fetchMarketsMethod": "fetch_markets_from_api", "fetchTickerMethod": "fetchTickerV1"},
    ),
    rate_limit="public REST 120 requests a minute; ccxt's 100 ms x cost 5",
)

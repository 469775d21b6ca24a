"""Coinbase Exchange (ex-Pro/GDAX; ccxt class ``coinbaseexchange``).

REST: markets from ccxt's ``load_markets`` (GET /products; recorded api.pro.coinbase.com/products, 2021);
tickers one by one, GET /products/{id}/ticker (ccxt's fetch_tickers reads sparklines, which carry no volume).

Websocket: the ``ticker`` channel (``{"type":"subscribe","product_ids":[...],"channels":["ticker"]}``):
``price`` is the last trade, ``time`` the exchange time, ``volume_24h`` the 24 h base volume."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from services.ingest.exchanges.base import (
    ExchangeNotice,
    ExchangeProfile,
    MalformedMessage,
    Venue,
    WsProtocol,
    make_tick,
    unrecognised,
)
from shared.messages import TickMessage


class CoinbaseProtocol(WsProtocol):
    """Coinbase Exchange feed: ``{"type":"subscribe","product_ids":[...],"channels":["ticker"]}``."""

    name = "coinbase"
    default_url = "wss://ws-feed.exchange.coinbase.com"

    def candidate_pair(self, base: str, quote: str) -> str:
        return f"{base}-{quote}"

    def subscribe_messages(self, pairs: Sequence[str]) -> list[str]:
        return [json.dumps({"type": "subscribe", "product_ids": list(pairs), "channels": ["ticker"]})]

    def parse(self, message: Any, received: datetime) -> list[TickMessage]:
        if not isinstance(message, dict):
            raise unrecognised(message)
        kind = message.get("type")
        if kind in ("subscriptions", "heartbeat"):
            return []
        if kind == "error":
            raise ExchangeNotice(f"coinbase error: {message.get('message')}: {message.get('reason')}")
        if kind != "ticker" or not isinstance(message.get("product_id"), str):
            raise unrecognised(message)
        pair = message["product_id"]
        base, quote = self.split(pair, "-")
        when = message.get("time")
        try:
            exchange_ts = datetime.fromisoformat(str(when).replace("Z", "+00:00")).astimezone(UTC)
        except ValueError:
            raise MalformedMessage(f"time {when!r} is not ISO 8601") from None
        return [
            make_tick(
                self.name,
                pair=pair,
                base=base,
                quote=quote,
                price=message.get("price"),
                price_kind="last",
                exchange_ts=exchange_ts,
                received=received,
                bid=message.get("best_bid"),
                ask=message.get("best_ask"),
                volume=message.get("volume_24h"),
            )
        ]


VENUE = Venue(
    name="coinbase",
    profile=ExchangeProfile("coinbaseexchange", tickers="single"),
    rate_limit="public REST 10 requests a second per IP; ccxt's limiter",
    websocket=CoinbaseProtocol,
)

"""Kraken.

REST: markets from ccxt's ``load_markets`` (GET /0/public/AssetPairs; Assets skipped, currencies are not
loaded; recorded 2021). Its ``.d`` dark-pool ids are dropped (they share BTC/USD with XXBTZUSD in lists up to
2021, and ccxt would keep whichever came last), and a pair listed without ``status`` (older lists such as the
recorded one) counts as trading. Tickers in one batch, GET /0/public/Ticker?pair=...

Websocket: v1 ``ticker`` (``{"event":"subscribe","pair":[...],"subscription":{"name":"ticker"}}``; frames
``[channelID, {...}, "ticker", "XBT/EUR"]``): ``c[0]`` is the last trade, ``v[1]`` the 24 h base volume; v1
sends no time, so the arrival time stands in. ccxt's client speaks v2 only and ignores these frames."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
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

# Kraken's X/Z-prefixed legacy asset codes and its names for bitcoin and dogecoin, where ccxt leaves them.
SYMBOL_ALIASES = {
    "XBT": "BTC", "XXBT": "BTC", "XDG": "DOGE", "XXDG": "DOGE", "XETH": "ETH", "XLTC": "LTC", "XXRP": "XRP",
    "ZUSD": "USD", "ZEUR": "EUR", "ZGBP": "GBP", "ZJPY": "JPY",
}  # fmt: skip
# How Kraken's websocket spells our codes in a pair name.
KRAKEN_CODES = {"BTC": "XBT", "DOGE": "XDG"}


def _dark_pool(market_id: str) -> bool:
    return market_id.endswith(".d")


class KrakenProtocol(WsProtocol):
    """Kraken websocket v1: ``{"event":"subscribe","pair":[...],"subscription":{"name":"ticker"}}``."""

    name = "kraken"
    default_url = "wss://ws.kraken.com"
    ping_after = 15.0
    ping_message = json.dumps({"event": "ping"})

    def ws_pair(self, market: dict[str, Any]) -> str | None:
        info = market.get("info") or {}
        wsname = info.get("wsname") if isinstance(info, dict) else None
        return str(wsname) if wsname else None

    def candidate_pair(self, base: str, quote: str) -> str:
        return f"{KRAKEN_CODES.get(base, base)}/{KRAKEN_CODES.get(quote, quote)}"

    def subscribe_messages(self, pairs: Sequence[str]) -> list[str]:
        return [json.dumps({"event": "subscribe", "pair": list(pairs), "subscription": {"name": "ticker"}})]

    def parse(self, message: Any, received: datetime) -> list[TickMessage]:
        if isinstance(message, dict):
            event = message.get("event")
            if event in ("heartbeat", "systemStatus", "pong"):
                return []
            if event == "subscriptionStatus":
                if message.get("status") == "error":
                    raise ExchangeNotice(f"kraken refused {message.get('pair')}: {message.get('errorMessage')}")
                return []
            if event == "error":
                raise ExchangeNotice(f"kraken error: {message.get('errorMessage')}")
            raise unrecognised(message)
        if not (isinstance(message, list) and len(message) == 4 and message[2] == "ticker"):
            raise unrecognised(message)
        body, pair = message[1], message[3]
        if not isinstance(body, dict) or not isinstance(pair, str):
            raise unrecognised(message)
        base, quote = self.split(pair, "/")

        def first(key: str, index: int = 0) -> object:
            value = body.get(key)
            if not isinstance(value, list) or len(value) <= index:
                raise MalformedMessage(f"ticker field {key!r} is {value!r}")
            return value[index]

        return [
            make_tick(
                self.name,
                pair=pair,
                base=base,
                quote=quote,
                price=first("c"),
                price_kind="last",
                # v1 ticker frames carry no time: the arrival is the exchange time we have.
                exchange_ts=received,
                received=received,
                bid=first("b"),
                ask=first("a"),
                volume=first("v", 1),
            )
        ]


VENUE = Venue(
    name="kraken",
    profile=ExchangeProfile("kraken", tickers="batch", status_field="status", skip_market_id=_dark_pool),
    rate_limit="public REST about 1 request a second; ccxt's 1000 ms limiter",
    symbol_aliases=SYMBOL_ALIASES,
    websocket=KrakenProtocol,
)

"""Binance (spot).

REST: markets from ccxt's ``load_markets`` (GET /api/v3/exchangeInfo, spot only; recorded full exchangeInfo of
2021); tickers in one batch, GET /api/v3/ticker/24hr.

Websocket: the combined streams ``/stream?streams=<s>@bookTicker/<s>@kline_1m``, frames ``{"stream", "data"}``.
The kline close is the last trade and its ``E`` the exchange time; until a market's first kline the mid of the
book top is published (``price_kind`` "mid", arrival time). The kline volume is one minute's, so no 24 h volume.
ccxt's own ``watch_ticker`` subscribes to ``@miniTicker``, which is not recorded anywhere."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from services.ingest.exchanges import our_symbol
from services.ingest.exchanges.base import (
    ExchangeNotice,
    ExchangeProfile,
    MalformedMessage,
    Venue,
    WsProtocol,
    make_tick,
    ms_time,
    positive,
    unrecognised,
)
from shared.http import rebase_url
from shared.messages import TickMessage

# Binance symbols are BASEQUOTE with no separator; when the market list is unknown, split on these quote codes
# (longest first so USDT wins over USD).
BINANCE_QUOTES = sorted(
    {"USDT", "USDC", "FDUSD", "BUSD", "TUSD", "USD", "EUR", "GBP", "JPY", "TRY", "BRL", "AUD", "BTC", "ETH", "BNB"},
    key=len,
    reverse=True,
)


class BinanceProtocol(WsProtocol):
    """Combined streams ``/stream?streams=<s>@bookTicker/<s>@kline_1m``: frames are ``{"stream", "data"}``."""

    name = "binance"
    default_url = "wss://stream.binance.com:9443"

    def __init__(self) -> None:
        super().__init__()
        self.book: dict[str, tuple[str, str]] = {}
        self.has_trades: set[str] = set()

    def reset(self) -> None:
        self.book.clear()
        self.has_trades.clear()

    def ws_pair(self, market: dict[str, Any]) -> str | None:
        value = market.get("id")
        return str(value).upper() if value else None

    def candidate_pair(self, base: str, quote: str) -> str:
        return f"{base}{quote}"

    def endpoint(self, base_url: str, pairs: Sequence[str]) -> str:
        streams = "/".join(f"{p.lower()}@{kind}" for p in pairs for kind in ("bookTicker", "kline_1m"))
        return rebase_url(f"/stream?streams={streams}", base_url)

    def subscribe_messages(self, pairs: Sequence[str]) -> list[str]:
        return []  # the streams are named in the URL

    def _symbol(self, symbol: str) -> tuple[str, str]:
        if symbol in self.known:
            return self.known[symbol]
        for quote in BINANCE_QUOTES:
            if symbol.endswith(quote) and len(symbol) > len(quote):
                return our_symbol(symbol[: -len(quote)]), our_symbol(quote)
        raise MalformedMessage(f"cannot tell base and quote of symbol {symbol!r}")

    def parse(self, message: Any, received: datetime) -> list[TickMessage]:
        if isinstance(message, dict) and "result" in message and "id" in message:
            return []  # reply to a SUBSCRIBE request
        if isinstance(message, dict) and (("code" in message and "msg" in message) or "error" in message):
            raise ExchangeNotice(f"binance error: {json.dumps(message)[:200]}")
        if not (isinstance(message, dict) and isinstance(message.get("data"), dict)):
            raise unrecognised(message)
        data = message["data"]
        symbol = data.get("s")
        if not isinstance(symbol, str) or not symbol:
            raise unrecognised(message)
        base, quote = self._symbol(symbol)
        if data.get("e") == "kline":
            kline = data.get("k")
            if not isinstance(kline, dict):
                raise MalformedMessage("kline event without its 'k' object")
            bid, ask = self.book.get(symbol, (None, None))
            tick = make_tick(
                self.name,
                pair=symbol,
                base=base,
                quote=quote,
                price=kline.get("c"),
                price_kind="last",
                exchange_ts=ms_time(data.get("E"), "E"),
                received=received,
                bid=bid,
                ask=ask,
            )
            self.has_trades.add(symbol)
            return [tick]
        if "e" not in data and "b" in data and "a" in data:
            bid_d, ask_d = positive(data.get("b"), "b"), positive(data.get("a"), "a")
            if bid_d is None or ask_d is None or ask_d < bid_d:
                raise MalformedMessage(f"book top bid={data.get('b')!r} ask={data.get('a')!r} is not a usable quote")
            self.book[symbol] = (str(data["b"]), str(data["a"]))
            if symbol in self.has_trades:
                # A last-trade price is flowing for this market; the book top only refreshes its bid/ask.
                return []
            mid = (bid_d + ask_d) / 2
            # The book-ticker event carries no time of its own: its arrival is the best estimate.
            return [
                make_tick(
                    self.name,
                    pair=symbol,
                    base=base,
                    quote=quote,
                    price=mid,
                    price_kind="mid",
                    exchange_ts=received,
                    received=received,
                    bid=bid_d,
                    ask=ask_d,
                )
            ]
        raise unrecognised(message)


VENUE = Venue(
    name="binance",
    profile=ExchangeProfile("binance", tickers="batch"),
    rate_limit="6000 request weight a minute per IP; ccxt's per-endpoint weights and limiter",
    websocket=BinanceProtocol,
)

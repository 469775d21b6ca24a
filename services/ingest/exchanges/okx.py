"""OKX (spot).

REST: /api/v5/public/instruments is not recorded anywhere, and spot ids are ``BASE-QUOTE``, so the markets
are built from the tracked coins and USDT/USDC quotes (``set_markets``). Tickers one by one, GET
/api/v5/market/ticker; a pair OKX does not list (error 51001, ccxt's BadSymbol) is reported and dropped
until the next open.

Websocket: v5 public ``tickers`` (``{"op":"subscribe","args":[{"channel":"tickers","instId":...}]}``), spot
rows only: ``last``, ``ts``, ``vol24h`` (base) and ``volCcy24h`` (quote). OKX closes a connection silent for
30 s; its keepalive is the text frame ``ping``, answered ``pong``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from services.ingest.exchanges.base import (
    ExchangeNotice,
    ExchangeProfile,
    Venue,
    WsProtocol,
    make_tick,
    ms_time,
    unrecognised,
)
from shared.messages import TickMessage


def _pair_id(base: str, quote: str) -> str:
    return f"{base}-{quote}"


class OkxProtocol(WsProtocol):
    """OKX v5 public: ``{"op":"subscribe","args":[{"channel":"tickers","instId":...}]}``; spot only."""

    name = "okx"
    default_url = "wss://ws.okx.com:8443/ws/v5/public"
    # OKX closes a connection that is silent for 30 s; its keepalive is the text frame "ping" -> "pong".
    ping_after = 20.0
    ping_message = "ping"

    def candidate_pair(self, base: str, quote: str) -> str:
        return _pair_id(base, quote)

    def subscribe_messages(self, pairs: Sequence[str]) -> list[str]:
        args = [{"channel": "tickers", "instId": pair} for pair in pairs]
        return [json.dumps({"op": "subscribe", "args": args})]

    def is_control_text(self, text: str) -> bool:
        return text == "pong"

    def parse(self, message: Any, received: datetime) -> list[TickMessage]:
        if not isinstance(message, dict):
            raise unrecognised(message)
        event = message.get("event")
        if event == "subscribe":
            return []
        if event == "error":
            raise ExchangeNotice(f"okx error {message.get('code')}: {message.get('msg')}")
        arg, data = message.get("arg"), message.get("data")
        if not (isinstance(arg, dict) and arg.get("channel") == "tickers" and isinstance(data, list)):
            raise unrecognised(message)
        ticks = []
        for row in data:
            if not isinstance(row, dict) or not isinstance(row.get("instId"), str):
                raise unrecognised(message)
            if row.get("instType") not in (None, "SPOT"):
                continue  # futures and swaps quote contracts, not the coin
            pair = row["instId"]
            base, quote = self.split(pair, "-")
            ticks.append(
                make_tick(
                    self.name,
                    pair=pair,
                    base=base,
                    quote=quote,
                    price=row.get("last"),
                    price_kind="last",
                    exchange_ts=ms_time(row.get("ts"), "ts"),
                    received=received,
                    bid=row.get("bidPx"),
                    ask=row.get("askPx"),
                    volume=row.get("vol24h"),
                    quote_volume=row.get("volCcy24h"),
                )
            )
        return ticks


VENUE = Venue(
    name="okx",
    profile=ExchangeProfile("okx", tickers="single", pair_quotes=("USDT", "USDC"), pair_id=_pair_id),
    rate_limit="market/ticker 20 requests per 2 s per IP; ccxt's limiter",
    websocket=OkxProtocol,
)

"""What every market-data source is, whatever its transport: the ``Source`` protocol, its errors and rejects,
the tick id, and which markets of a venue we follow."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from services.ingest.exchanges import our_symbol
from shared.messages import TickMessage

# Quotes we take for a tracked coin, in order of preference. Stablecoin quotes stay as sent; pricing
# decides how they count toward USD.
PREFERRED_QUOTES = ("USD", "USDT", "USDC", "EUR", "GBP", "JPY")
MEASURED_STABLECOINS = ("USDT", "USDC")


class SourceError(Exception):
    """A source failed in a way the runner should report; ``kind`` groups errors in counts.

    Kinds from REST sources: ``rate_limited`` (429), ``banned`` (418: IP ban, longer backoff), ``timeout``,
    ``unavailable`` (5xx, connection refused), ``network``, ``bad_response`` (truncated or reshaped body),
    ``rejected_request`` (other 4xx), ``unknown_symbol``, ``exchange_error``, ``no_markets``."""

    def __init__(self, kind: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


@dataclass(slots=True)
class Rejected:
    """A quote the source sent that we refused, with the reason (logged and counted, never stored)."""

    pair: str
    reason: str
    # Groups the report in error counts: a bad quote, or a symbol the exchange does not list.
    kind: str = "rejected_quote"


class Source(Protocol):
    name: str
    kind: str

    async def open(self, coins: list[str]) -> None: ...

    async def poll(self) -> tuple[list[TickMessage], list[Rejected]]: ...

    async def close(self) -> None: ...


def tick_id(source: str, pair: str, exchange_ts: datetime, price: Decimal) -> str:
    # The same quote polled twice maps to the same id, so replays and re-polls are harmless.
    return f"{source}:{pair}:{int(exchange_ts.timestamp() * 1000)}:{price.normalize()}"


def select_symbols(markets: Iterable[dict[str, Any]], coins: list[str]) -> list[str]:
    """For each tracked coin, the active spot markets quoted in a currency we use (exchange codes mapped to ours)."""
    wanted = set(coins)
    chosen: list[tuple[int, str]] = []
    for market in markets:
        base, quote = market.get("base"), market.get("quote")
        if not isinstance(base, str) or not isinstance(quote, str):
            continue
        base, quote = our_symbol(base), our_symbol(quote)
        # Stablecoins' own USD markets are followed too: pricing measures their USD rate from them
        # instead of assuming parity for every USDT- or USDC-quoted price.
        measured_stablecoin = base in MEASURED_STABLECOINS and quote == "USD"
        if not measured_stablecoin and (base not in wanted or quote not in PREFERRED_QUOTES):
            continue
        if market.get("spot") is False or market.get("active") is False:
            continue
        chosen.append((PREFERRED_QUOTES.index(quote), market["symbol"]))
    return [symbol for _, symbol in sorted(chosen)]

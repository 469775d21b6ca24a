"""What a venue module declares (``Venue``, ``ExchangeProfile``, a ``WsProtocol`` subclass) and the helpers its
frame parser uses. Nothing here names an exchange."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar, Literal

from pydantic import ValidationError

from services.ingest.exchanges import our_symbol
from services.ingest.sources import tick_id
from shared.messages import TickMessage, to_decimal

TickersHow = Literal["batch", "single", "auto"]
# The REST source's own call wrapper: runs a ccxt method and turns its failures into SourceError.
CcxtCall = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class ExchangeProfile:
    """How an exchange is reached through ccxt (REST markets and tickers). Every field but ``ccxt_id`` is an
    exception to ccxt's defaults, declared by the venue module that needs it."""

    ccxt_id: str
    # batch: one fetch_tickers call; single: fetch_ticker per symbol; auto: batch when ccxt has fetchTickers.
    tickers: TickersHow = "auto"
    # Set only where ccxt's default is looser than the exchange's documented public limit.
    rate_limit_ms: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    # Markets built from the tracked coins instead of loaded (the exchange's market list is not recorded):
    # the quotes to list for each coin, and how the exchange spells a spot market id.
    pair_quotes: tuple[str, ...] = ()
    pair_id: Callable[[str, str], str] | None = None
    # Runs before ccxt's load_markets while no markets are loaded, e.g. to hand ccxt a market list from
    # another endpoint through its cache.
    prime_markets: Callable[[Any, CcxtCall], Awaitable[None]] | None = None
    # ccxt reads ``active`` from this field of each market; older recorded lists predate the field, and a
    # market listed without it is taken as trading (ccxt would call it inactive and never poll it).
    status_field: str | None = None
    # Market ids that are not ordinary order books (dropped after loading).
    skip_market_id: Callable[[str], bool] | None = None


@dataclass(frozen=True, slots=True)
class Venue:
    """Everything about one exchange; a venue module's ``VENUE``."""

    name: str
    profile: ExchangeProfile
    # The exchange's documented public limit, and how we stay under it (for people; ccxt's limiter enforces).
    rate_limit: str
    # Exchange codes ccxt may leave as sent, mapped to ours.
    symbol_aliases: Mapping[str, str] = field(default_factory=dict)
    # The websocket dialect; None: REST polling only.
    websocket: type[WsProtocol] | None = None


PriceKind = Literal["last", "mid"]


class MalformedMessage(Exception):
    """A frame we cannot use (bad JSON, unknown shape, unusable price): skipped, logged and counted."""


class ExchangeNotice(Exception):
    """The exchange reported an error on the socket (e.g. a refused subscription): logged and counted."""


class WsProtocol:
    """One exchange's websocket dialect. ``parse`` is pure apart from per-connection state set up by ``reset``."""

    name: ClassVar[str]
    default_url: ClassVar[str]
    # App-level keepalive sent after this many quiet seconds (None: the websocket ping frames suffice).
    ping_after: ClassVar[float | None] = None
    ping_message: ClassVar[str | None] = None

    def __init__(self) -> None:
        # Exchange pair id -> (our base, our quote), from the markets we subscribed to.
        self.known: dict[str, tuple[str, str]] = {}

    def reset(self) -> None:
        """Forget per-connection state (a new connection starts over)."""

    def ws_pair(self, market: dict[str, Any]) -> str | None:
        value = market.get("id")
        return str(value) if value else None

    def candidate_pair(self, base: str, quote: str) -> str:
        raise NotImplementedError

    def endpoint(self, base_url: str, pairs: Sequence[str]) -> str:
        return base_url

    def subscribe_messages(self, pairs: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def is_control_text(self, text: str) -> bool:
        """A non-JSON frame that belongs to the protocol (e.g. okx's ``pong``)."""
        return False

    def parse(self, message: Any, received: datetime) -> list[TickMessage]:
        raise NotImplementedError

    def split(self, pair: str, sep: str) -> tuple[str, str]:
        if pair in self.known:
            return self.known[pair]
        base, found, quote = pair.partition(sep)
        if not found or not base or not quote:
            raise MalformedMessage(f"pair {pair!r} is not BASE{sep}QUOTE")
        return our_symbol(base), our_symbol(quote)


def number(value: object, field: str) -> Decimal | None:
    try:
        return to_decimal(value)
    except (ValueError, TypeError) as exc:
        raise MalformedMessage(f"{field}: {exc}") from None


def positive(value: object, field: str) -> Decimal | None:
    result = number(value, field)
    return result if result is not None and result > 0 else None


def ms_time(value: object, field: str) -> datetime:
    result = number(value, field)
    if result is None or result <= 0:
        raise MalformedMessage(f"{field} is {value!r}, not a time in milliseconds")
    return datetime.fromtimestamp(float(result) / 1000, tz=UTC)


def unrecognised(message: Any) -> MalformedMessage:
    text = json.dumps(message, separators=(",", ":"), default=str)
    return MalformedMessage(f"unrecognised message: {text[:160]}")


def make_tick(
    source: str,
    *,
    pair: str,
    base: str,
    quote: str,
    price: object,
    price_kind: PriceKind,
    exchange_ts: datetime,
    received: datetime,
    bid: object = None,
    ask: object = None,
    volume: object = None,
    quote_volume: object = None,
) -> TickMessage:
    value = number(price, "price")
    if value is None or value <= 0:
        raise MalformedMessage(f"price is {price!r}: a quote needs a positive price")
    try:
        return TickMessage(
            tick_id=tick_id(source, pair, exchange_ts, value),
            source=source,
            base=our_symbol(base),
            quote=our_symbol(quote),
            pair=pair,
            price=value,
            bid=positive(bid, "bid"),
            ask=positive(ask, "ask"),
            volume_24h=number(volume, "volume"),
            quote_volume_24h=number(quote_volume, "quote volume"),
            exchange_ts=exchange_ts,
            received_at=received,
            transport="ws",
            price_kind=price_kind,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise MalformedMessage(problems) from None

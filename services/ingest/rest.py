"""REST polling through ccxt, for any exchange ccxt knows by its id.

A venue module (services/ingest/exchanges/) may declare an ``ExchangeProfile`` saying how its markets are
loaded and its tickers fetched; any other name gets ccxt's own ``load_markets`` and ``fetch_tickers`` (or
``fetch_ticker`` per symbol where ccxt has no batch call), so enabling e.g. ``bybit`` in ``COINLYTICS_SOURCES``
needs no code change. Nothing here names an exchange.

Symbols: ccxt already turns exchange codes into unified ones (``commonCurrencies``: XBT->BTC, XDG->DOGE on
Kraken, ...); ``our_symbol`` applies the venues' own aliases on top, so a tick's base/quote are our symbols.
Quotes are kept as sent (USDT stays USDT): pricing decides how a stablecoin counts toward USD.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import ccxt.async_support as ccxt_async

from services.ingest.exchanges import our_symbol, venue_for
from services.ingest.exchanges.base import ExchangeProfile
from services.ingest.sources import Rejected, SourceError, select_symbols, tick_id
from shared.ccxt_client import build_exchange, has_exchange, response_retry_after
from shared.messages import TickMessage, to_decimal


def profile_for(name: str) -> ExchangeProfile:
    """The profile of a source name; any other ccxt exchange id gets the generic one."""
    venue = venue_for(name)
    profile = venue.profile if venue is not None else ExchangeProfile(name)
    if not has_exchange(profile.ccxt_id):
        raise ValueError(f"unknown source {name!r}: ccxt has no exchange by that name")
    return profile


def _ts(ms: object, fallback: datetime) -> datetime:
    if isinstance(ms, int | float) and math.isfinite(ms) and ms > 0:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)
    return fallback


# A single-symbol failure of one of these kinds is that symbol's problem; anything else stops the poll.
PER_SYMBOL_KINDS = frozenset({"unknown_symbol", "rejected_request"})


class CcxtRestSource:
    """Polls an exchange's REST ticker endpoint(s) through ccxt (any exchange ccxt knows, by name)."""

    kind = "rest"

    def __init__(self, name: str, *, rest_url: str | None, timeout_seconds: float) -> None:
        self.profile = profile_for(name)
        self.name = name
        self.rest_url = rest_url
        self.timeout_seconds = timeout_seconds
        self.exchange: Any = None
        self.coins: list[str] = []
        self.symbols: list[str] = []
        # Tracked coins with no market on this exchange; reported once per open.
        self.unlisted: list[str] = []
        # Symbols the exchange refused as unknown since the last open (pair-map exchanges find out this way).
        self.dropped: set[str] = set()
        self.last_status: int | None = None

    def _build(self) -> Any:
        exchange = build_exchange(
            self.profile.ccxt_id,
            timeout_seconds=self.timeout_seconds,
            rest_url=self.rest_url,
            rate_limit_ms=self.profile.rate_limit_ms,
            options=self.profile.options,
        )
        original = exchange.on_rest_response

        def on_rest_response(code: Any, reason: Any, url: str, method: str, headers: Any, body: Any,
                             request_headers: Any, request_body: Any) -> Any:  # fmt: skip
            body = original(code, reason, url, method, headers, body, request_headers, request_body)
            self.last_status = int(code) if code is not None else None
            # ccxt hands an unparseable body to the parsers as text, where it passes silently as "no tickers"
            # (every market then dropped as unlisted, the source mute until reopened): a success whose body
            # is not a JSON object or array (garbage, an HTML page, JSON that does not parse) is a broken
            # response. Leading whitespace is dropped: ccxt only parses a body starting with { or [.
            if isinstance(body, str) and self.last_status is not None and self.last_status < 300:
                body = body.lstrip()
                if body[:1] not in ("{", "["):
                    raise ccxt_async.BadResponse(
                        f"{self.name} sent a body that is not JSON ({len(body)} bytes) from {url}"
                    )
                try:
                    json.loads(body)
                except ValueError:
                    raise ccxt_async.BadResponse(
                        f"{self.name} sent malformed JSON ({len(body)} bytes) from {url}"
                    ) from None
            return body

        exchange.on_rest_response = on_rest_response
        exchange.safe_ticker = _strict_safe_ticker(exchange.safe_ticker)
        return exchange

    async def open(self, coins: list[str]) -> None:
        if self.exchange is None:
            self.exchange = self._build()
        self.coins = list(coins)
        self.dropped = set()
        if not coins:
            self.symbols, self.unlisted = [], []
            return
        markets = await self._load_markets(coins)
        self.symbols = select_symbols(markets.values(), coins)
        listed = {our_symbol(str(markets[s].get("base") or "")) for s in self.symbols}
        self.unlisted = [coin for coin in coins if coin not in listed]
        if not self.symbols:
            raise SourceError("no_markets", f"{self.name} lists no spot market for {', '.join(coins)}")

    async def _load_markets(self, coins: list[str]) -> dict[str, Any]:
        exchange = self.exchange
        profile = self.profile
        if profile.pair_id is not None:
            exchange.set_markets(pair_map_markets(coins, profile.pair_quotes, profile.pair_id))
            return dict(exchange.markets)
        if profile.prime_markets is not None and exchange.markets is None:
            await profile.prime_markets(exchange, self._call)
        markets = await self._call(exchange.load_markets)
        if not isinstance(markets, dict):
            raise SourceError("bad_response", f"{self.name} markets are {type(markets).__name__}, not a mapping")
        skip = self.profile.skip_market_id
        if skip is not None:
            by_id = exchange.markets_by_id or {}
            exchange.set_markets([m for group in by_id.values() for m in group if not skip(str(m.get("id")))])
            markets = dict(exchange.markets)
        status_field = self.profile.status_field
        if status_field is not None:
            for market in markets.values():
                info = market.get("info")
                if isinstance(info, dict) and status_field not in info and market.get("active") is False:
                    market["active"] = True
        return markets

    def _ticker_mode(self) -> Literal["batch", "single"]:
        if self.profile.tickers != "auto":
            return self.profile.tickers
        return "batch" if self.exchange.has.get("fetchTickers") else "single"

    async def poll(self) -> tuple[list[TickMessage], list[Rejected]]:
        exchange = self.exchange
        if exchange is None:
            raise SourceError("not_open", "source not opened")
        rejected: list[Rejected] = [
            Rejected(pair=coin, reason=f"{coin} is not listed on {self.name}", kind="unknown_symbol")
            for coin in self.unlisted
        ]
        # Reported once per open: the runner logs and stores them, the next polls stay quiet.
        self.unlisted = []
        symbols = [s for s in self.symbols if s not in self.dropped]
        if not symbols:
            return [], rejected
        received = datetime.now(UTC)
        tickers: dict[str, Any]
        if self._ticker_mode() == "batch":
            result = await self._call(exchange.fetch_tickers, symbols)
            if not isinstance(result, dict):
                raise SourceError("bad_response", f"{self.name} returned {type(result).__name__}, not tickers")
            tickers = result
        else:
            tickers = await self._fetch_one_by_one(symbols, rejected)
        ticks: list[TickMessage] = []
        for symbol in symbols:
            ticker = tickers.get(symbol)
            market = exchange.markets.get(symbol, {})
            pair = str(market.get("id") or symbol)
            if ticker is None:
                if self._ticker_mode() == "batch":
                    # Not in the exchange's ticker list: not traded there now. Reported once, then left out
                    # until the next open so a delisted pair does not fill the error log.
                    self.dropped.add(symbol)
                    reason = f"{self.name} sent no ticker for {symbol}"
                    rejected.append(Rejected(pair=pair, reason=reason, kind="unknown_symbol"))
                continue
            try:
                ticks.append(self._to_tick(symbol, market, ticker, received))
            except (ValueError, TypeError, KeyError) as exc:
                rejected.append(Rejected(pair=pair, reason=str(exc)))
        return ticks, rejected

    async def _fetch_one_by_one(self, symbols: list[str], rejected: list[Rejected]) -> dict[str, Any]:
        tickers: dict[str, Any] = {}
        failures: list[SourceError] = []
        for symbol in symbols:
            try:
                ticker = await self._call(self.exchange.fetch_ticker, symbol)
            except SourceError as exc:
                if exc.kind not in PER_SYMBOL_KINDS:
                    raise
                failures.append(exc)
                pair = str(self.exchange.markets.get(symbol, {}).get("id") or symbol)
                kind = "unknown_symbol" if exc.kind == "unknown_symbol" or self.last_status == 404 else exc.kind
                if kind == "unknown_symbol":
                    self.dropped.add(symbol)
                rejected.append(Rejected(pair=pair, reason=str(exc), kind=kind))
                continue
            if isinstance(ticker, dict):
                tickers[symbol] = ticker
            else:
                rejected.append(Rejected(pair=symbol, reason=f"ticker is {type(ticker).__name__}"))
        if failures and len(failures) == len(symbols):
            # Nothing came through: the source is failing, not one of its symbols.
            raise failures[-1]
        return tickers

    def _to_tick(self, symbol: str, market: dict[str, Any], ticker: dict[str, Any], received: datetime) -> TickMessage:
        if UNPARSEABLE in ticker:
            raise ValueError(f"unparseable ticker (last price {ticker.get(SENT_LAST)!r}): {ticker[UNPARSEABLE]}")
        answered = ticker.get("symbol")
        if isinstance(answered, str) and answered != symbol:
            # ccxt names the ticker by the market id in the body: an answer for another market is not this quote.
            raise ValueError(f"asked for {symbol}, the exchange answered for {answered}")
        sent = ticker.get(SENT_LAST)
        if sent is None:
            sent = ticker.get("last") if ticker.get("last") is not None else ticker.get("close")
        price = to_decimal(sent)
        if price is None or price <= 0:
            raise ValueError(f"price is {price!r}: a quote needs a positive last price")
        exchange_ts = _ts(ticker.get("timestamp"), received)
        pair = market.get("id") or symbol
        base_code, _, quote_code = symbol.partition(":")[0].partition("/")
        return TickMessage(
            tick_id=tick_id(self.name, str(pair), exchange_ts, price),
            source=self.name,
            base=our_symbol(str(market.get("base") or base_code)),
            quote=our_symbol(str(market.get("quote") or quote_code)),
            pair=str(pair),
            price=price,
            bid=_positive_or_none(ticker.get("bid")),
            ask=_positive_or_none(ticker.get("ask")),
            volume_24h=to_decimal(ticker.get("baseVolume")),
            quote_volume_24h=to_decimal(ticker.get("quoteVolume")),
            exchange_ts=exchange_ts,
            received_at=received,
        )

    async def _call(self, method: Any, *args: Any) -> Any:
        self.last_status = None
        try:
            return await method(*args)
        except ccxt_async.BaseError as exc:
            raise self._classify(exc) from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            if self.last_status is not None and self.last_status >= 400:
                # Some ccxt error handlers trip over an error body they do not expect; the status tells.
                raise self._classify(ccxt_async.ExchangeError(f"HTTP {self.last_status}: {exc}")) from None
            # ccxt's parsers meet a reshaped body this way.
            raise SourceError("bad_response", f"unparseable response: {type(exc).__name__}: {exc}") from None

    def _classify(self, exc: Exception) -> SourceError:
        status = self.last_status
        message = _short(exc)
        if status == 418:
            return SourceError("banned", f"HTTP 418 (IP banned): {message}", retry_after=self._retry_after())
        if status == 429 or isinstance(exc, ccxt_async.DDoSProtection):
            return SourceError("rate_limited", message, retry_after=self._retry_after())
        if isinstance(exc, ccxt_async.RequestTimeout):
            return SourceError("timeout", message)
        if isinstance(exc, ccxt_async.BadResponse):
            return SourceError("bad_response", message)
        if isinstance(exc, ccxt_async.BadSymbol):
            return SourceError("unknown_symbol", message)
        if status is not None and 400 <= status < 500:
            return SourceError("rejected_request", f"HTTP {status}: {message}")
        if (status is not None and status >= 500) or isinstance(exc, ccxt_async.ExchangeNotAvailable):
            return SourceError("unavailable", message)
        if isinstance(exc, ccxt_async.NetworkError):
            return SourceError("network", message)
        return SourceError("exchange_error", message)

    def _retry_after(self) -> float | None:
        return response_retry_after(self.exchange)

    async def close(self) -> None:
        if self.exchange is not None:
            await self.exchange.close()
            self.exchange = None


def pair_map_markets(
    coins: Iterable[str], quotes: Iterable[str], pair_id: Callable[[str, str], str]
) -> list[dict[str, Any]]:
    """ccxt market structures for an exchange whose market list we do not load: one spot market per tracked
    coin and quote, with the exchange's id spelling."""
    markets = []
    for base in coins:
        for quote in quotes:
            if base == quote:
                continue
            market_id = pair_id(base, quote)
            markets.append({
                "id": market_id, "symbol": f"{base}/{quote}", "base": base, "quote": quote,
                "baseId": base, "quoteId": quote, "settle": None, "settleId": None,
                "type": "spot", "spot": True, "margin": False, "swap": False, "future": False,
                "option": False, "contract": False, "active": True, "linear": None, "inverse": None,
                "info": {"source": "pair map"},
            })  # fmt: skip
    return markets


# Keys _strict_safe_ticker adds to a ccxt ticker.
SENT_LAST = "coinlyticsSentLast"
UNPARSEABLE = "coinlyticsUnparseable"


def _strict_safe_ticker(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps an exchange's ``safe_ticker``, which every ccxt ``parse_ticker`` ends with. ccxt replaces a zero or
    missing last price with one derived from open and change, a price the exchange never sent: the one it sent is
    kept under SENT_LAST. One ticker that does not parse ("NaN") would fail the whole list: it is marked
    UNPARSEABLE instead, for _to_tick to reject alone."""

    def safe_ticker(ticker: dict[str, Any], market: Any = None) -> dict[str, Any]:
        sent = ticker.get("last") if ticker.get("last") is not None else ticker.get("close")
        try:
            result: dict[str, Any] = original(ticker, market)
        except (ValueError, TypeError, ArithmeticError) as exc:
            return {"symbol": ticker.get("symbol"), "info": ticker.get("info"), SENT_LAST: sent,
                    UNPARSEABLE: f"{type(exc).__name__}: {exc}"}  # fmt: skip
        result[SENT_LAST] = sent
        return result

    return safe_ticker


def _positive_or_none(value: object) -> Decimal | None:
    try:
        number = to_decimal(value)
    except ValueError:
        return None
    return number if number is not None and number > 0 else None


def _short(exc: Exception, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Market-data sources. Exchanges are reached through ccxt; ``sim`` is an opt-in offline generator.

REST polling through ccxt (``CcxtRestSource``) works for any exchange ccxt knows, by its ccxt name. The seven
exchanges of the design have a profile below that says how their markets are loaded and how tickers are fetched;
any other name gets the generic profile (ccxt's own ``load_markets`` and ``fetch_tickers``), so enabling e.g.
``bybit`` in ``COINLYTICS_SOURCES`` needs no code change.

How each profiled exchange is loaded (ccxt 4.5.x), and why:

================  ===================  ==========================================  ====================================
source            markets              how, and the recorded payload it matches    tickers (REST), documented limit
================  ===================  ==========================================  ====================================
binance           ccxt load_markets    GET /api/v3/exchangeInfo (spot only); the   batch: GET /api/v3/ticker/24hr;
                                       recorded full exchangeInfo (2021)           6000 weight/min, ccxt's costs
kraken            ccxt load_markets    GET /0/public/AssetPairs (Assets skipped:   batch: GET /0/public/Ticker?pair=..;
                                       currencies are not loaded); recorded 2021.  public ~1 req/s (ccxt 1000 ms)
                                       Its ".d" dark-pool ids are dropped, and a
                                       pair listed without ``status`` (older lists
                                       such as this one) counts as trading
coinbase          ccxt load_markets    ccxt class ``coinbaseexchange`` (Exchange   single: GET /products/{id}/ticker
                                       API, ex-Pro/GDAX): GET /products; recorded  (ccxt's fetch_tickers reads
                                       api.pro.coinbase.com/products (2021)        sparklines, no volume); 10 req/s
bitstamp          older endpoint,      ccxt reads /api/v2/markets/ (not recorded). single: GET /api/v2/ticker/{pair}/;
                  parsed by ccxt       We call ccxt's own GET /api/v2/trading-     the all-pairs /api/v2/ticker/ is
                                       pairs-info/ (recorded 2022), rename its     not recorded; 8000 req/10 min
                                       fields to the markets/ shape and hand them
                                       to ccxt's fetch_markets through its cache
okx               pair map,            /api/v5/public/instruments is not recorded  single: GET /api/v5/market/ticker;
                  ``set_markets()``    anywhere. Spot ids are ``BASE-QUOTE``, so    20 req/2 s. A pair OKX does not
                                       markets are built from the tracked coins    list (error 51001 -> BadSymbol) is
                                       and USDT/USDC quotes                        reported and dropped until re-open
kucoin            ccxt load_markets,   ccxt reads /api/v2/symbols (not recorded);  batch: GET /api/v1/market/allTickers
                  v1 endpoint          its ``versions`` option points it at        (weight 15, once per poll), ccxt's
                                       /api/v1/symbols (recorded 2021, same        weight costs
                                       fields ccxt reads)
gemini            ccxt load_markets    ``fetch_markets_from_api``: GET /v1/symbols single: GET /v1/pubticker/{symbol};
                                       (recorded 2021; ids parsed by ccxt; the     120 req/min public = ccxt's 100 ms
                                       per-symbol details are not fetched), not    x cost 5
                                       the docs-site scrape
(any other)       ccxt load_markets    whatever ccxt calls                         batch if ccxt has fetchTickers
================  ===================  ==========================================  ====================================

Symbols: ccxt already turns exchange codes into unified ones (``commonCurrencies``: XBT->BTC, XDG->DOGE on
Kraken, ...); ``our_symbol`` applies the project's own aliases on top, so a tick's base/quote are our symbols.
Quotes are kept as sent (USDT stays USDT): pricing decides how a stablecoin counts toward USD.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import ccxt.async_support as ccxt_async

from shared.messages import TickMessage, to_decimal

# Quotes we take for a tracked coin, in order of preference. Stablecoin quotes stay as sent; pricing
# decides how they count toward USD.
PREFERRED_QUOTES = ("USD", "USDT", "USDC", "EUR", "GBP", "JPY")
SIM_SOURCES = ("sim-alpha", "sim-beta", "sim-gamma")

# Exchange codes ccxt may leave as sent, mapped to ours (Kraken's X/Z-prefixed legacy asset codes among them).
SYMBOL_ALIASES = {
    "XBT": "BTC", "XXBT": "BTC", "XDG": "DOGE", "XXDG": "DOGE", "XETH": "ETH", "XLTC": "LTC", "XXRP": "XRP",
    "ZUSD": "USD", "ZEUR": "EUR", "ZGBP": "GBP", "ZJPY": "JPY",
}  # fmt: skip


def our_symbol(code: str) -> str:
    upper = code.upper()
    return SYMBOL_ALIASES.get(upper, upper)


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


def rebase_url(url: str, base: str) -> str:
    """Point ``url`` at ``base`` (scheme, host and path prefix), keeping the endpoint's own path."""
    target = urlsplit(base)
    original = urlsplit(url)
    path = target.path.rstrip("/") + original.path
    return urlunsplit((target.scheme, target.netloc, path, original.query, original.fragment))


def _rebase_tree(node: Any, base: str) -> Any:
    if isinstance(node, str) and node.startswith(("http://", "https://")):
        return rebase_url(node, base)
    if isinstance(node, dict):
        return {key: _rebase_tree(value, base) for key, value in node.items()}
    return node


def _ts(ms: object, fallback: datetime) -> datetime:
    if isinstance(ms, int | float) and math.isfinite(ms) and ms > 0:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)
    return fallback


# An hour-long ban is plausible; a header asking for more than a day is a broken server, not a plan.
MAX_RETRY_AFTER_SECONDS = 86_400.0


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date, RFC 9110); None when absent
    or unreadable. Shared by every HTTP source of ingest (exchanges through ccxt, CoinGecko)."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


MarketsHow = Literal["ccxt", "bitstamp_pairs_info", "pair_map"]
TickersHow = Literal["batch", "single", "auto"]


@dataclass(frozen=True, slots=True)
class ExchangeProfile:
    """How one exchange is reached; see the module docstring for the reasons per exchange."""

    ccxt_id: str
    markets: MarketsHow = "ccxt"
    tickers: TickersHow = "auto"
    # Set only where ccxt's default is looser than the exchange's documented public limit.
    rate_limit_ms: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # pair_map only: quotes to list for each tracked coin, and how the exchange spells a spot market id.
    pair_quotes: tuple[str, ...] = ()
    pair_id: Callable[[str, str], str] | None = None
    # ccxt reads ``active`` from this field of each market; older recorded lists predate the field, and a
    # market listed without it is taken as trading (ccxt would call it inactive and never poll it).
    status_field: str | None = None
    # Market ids that are not ordinary order books (Kraken's ".d" dark-pool pairs share BTC/USD with XXBTZUSD
    # in lists up to 2021, and ccxt would keep whichever came last).
    skip_market_id: Callable[[str], bool] | None = None


def _kraken_dark_pool(market_id: str) -> bool:
    return market_id.endswith(".d")


def _okx_pair_id(base: str, quote: str) -> str:
    return f"{base}-{quote}"


PROFILES: dict[str, ExchangeProfile] = {
    "binance": ExchangeProfile("binance", tickers="batch"),
    "kraken": ExchangeProfile("kraken", tickers="batch", status_field="status", skip_market_id=_kraken_dark_pool),
    "coinbase": ExchangeProfile("coinbaseexchange", tickers="single"),
    "bitstamp": ExchangeProfile("bitstamp", markets="bitstamp_pairs_info", tickers="single"),
    "okx": ExchangeProfile(
        "okx", markets="pair_map", tickers="single", pair_quotes=("USDT", "USDC"), pair_id=_okx_pair_id
    ),
    "kucoin": ExchangeProfile(
        "kucoin",
        tickers="batch",
        options={
            "versions": {"public": {"GET": {"symbols": "v1"}}},
            # Fees come from a second allTickers call on load; quotes do not need them.
            "fetchMarkets": {"fetchTickersFees": False},
        },
    ),
    "gemini": ExchangeProfile(
        "gemini",
        tickers="single",
        options={"fetchMarketsMethod": "fetch_markets_from_api", "fetchTickerMethod": "fetchTickerV1"},
    ),
}


def profile_for(name: str) -> ExchangeProfile:
    """The profile of a source name; any other ccxt exchange id gets the generic one."""
    profile = PROFILES.get(name)
    if profile is None:
        profile = ExchangeProfile(name)
    if not hasattr(ccxt_async, profile.ccxt_id):
        raise ValueError(f"unknown source {name!r}: ccxt has no exchange by that name")
    return profile


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
        config: dict[str, Any] = {
            "enableRateLimit": True,
            "timeout": int(self.timeout_seconds * 1000),
            # Currencies need a private endpoint on several exchanges; markets are all we use.
            "has": {"fetchCurrencies": False},
            "options": {"fetchMarkets": {"types": ["spot"]}, "defaultType": "spot"},
        }
        if self.profile.rate_limit_ms is not None:
            config["rateLimit"] = self.profile.rate_limit_ms
        exchange = getattr(ccxt_async, self.profile.ccxt_id)(config)
        if self.profile.options:
            exchange.options = exchange.deep_extend(exchange.options, self.profile.options)
        if self.rest_url:
            exchange.urls["api"] = _rebase_tree(exchange.urls["api"], self.rest_url)
        exchange.enableLastResponseHeaders = True
        original = exchange.on_rest_response

        def on_rest_response(code: Any, reason: Any, url: str, method: str, headers: Any, body: Any,
                             request_headers: Any, request_body: Any) -> Any:  # fmt: skip
            body = original(code, reason, url, method, headers, body, request_headers, request_body)
            self.last_status = int(code) if code is not None else None
            # ccxt hands an unparseable JSON body to the parsers as text, where it may pass silently as
            # "no tickers"; a body that starts like JSON and does not parse is a broken response.
            looks_json = isinstance(body, str) and body[:1] in ("{", "[")
            if looks_json and self.last_status is not None and self.last_status < 300:
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
        how = self.profile.markets
        if how == "pair_map":
            if self.profile.pair_id is None:
                raise ValueError(f"{self.name}: a pair-map profile needs pair_id")
            exchange.set_markets(pair_map_markets(coins, self.profile.pair_quotes, self.profile.pair_id))
            return dict(exchange.markets)
        if how == "bitstamp_pairs_info" and exchange.markets is None:
            rows = await self._call(exchange.publicGetTradingPairsInfo)
            if not isinstance(rows, list):
                raise SourceError("bad_response", f"{self.name} trading-pairs-info is not a list")
            # ccxt's fetch_markets reads its cached markets/ response when one is present and not expired.
            exchange.options["fetchMarkets"] = {
                **exchange.options.get("fetchMarkets", {}),
                "response": bitstamp_markets_rows(rows),
                "timestamp": exchange.milliseconds(),
                "expires": None,
            }
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
        headers = getattr(self.exchange, "last_response_headers", None) or {}
        for key, value in headers.items():
            if str(key).lower() == "retry-after":
                return parse_retry_after(str(value))
        return None

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


def bitstamp_markets_rows(rows: list[Any]) -> list[dict[str, Any]]:
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


MEASURED_STABLECOINS = ("USDT", "USDC")


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


# Rough reference levels so simulated prices look plausible; unknown coins start at 1.
SIM_START_PRICES = {
    "BTC": 65000.0, "ETH": 3400.0, "SOL": 150.0, "XRP": 0.6, "ADA": 0.45, "DOGE": 0.15,
    "LTC": 80.0, "DOT": 6.5, "LINK": 15.0, "AVAX": 30.0,
}  # fmt: skip


class SimSource:
    """Offline demo and benchmark feed: a geometric random walk per coin, seen by three simulated
    venues, each with its own small bias and noise. Named ``sim-*`` so it is never mistaken for a market."""

    kind = "sim"

    def __init__(self, name: str, *, seed: int | None, interval_seconds: float) -> None:
        self.name = name
        self.rng = random.Random(seed)
        self.interval_seconds = interval_seconds
        self.mid: dict[str, float] = {}
        self.venue_bias = {venue: self.rng.uniform(-0.0015, 0.0015) for venue in SIM_SOURCES}

    async def open(self, coins: list[str]) -> None:
        for coin in coins:
            self.mid.setdefault(coin, SIM_START_PRICES.get(coin, 1.0) * self.rng.uniform(0.97, 1.03))
        for coin in list(self.mid):
            if coin not in coins:
                del self.mid[coin]

    async def poll(self) -> tuple[list[TickMessage], list[Rejected]]:
        now = datetime.now(UTC)
        # Annualised volatility of ~80% scaled to one step.
        step_sigma = 0.8 * math.sqrt(self.interval_seconds / (365 * 24 * 3600))
        ticks = []
        for coin, mid in self.mid.items():
            mid *= math.exp(self.rng.gauss(0, step_sigma))
            self.mid[coin] = mid
            for venue in SIM_SOURCES:
                price = mid * (1 + self.venue_bias[venue] + self.rng.gauss(0, 0.0004))
                spread = price * 0.0005
                price_d = _sim_decimal(price)
                pair = f"{coin}-USD"
                ticks.append(
                    TickMessage(
                        tick_id=tick_id(venue, pair, now, price_d),
                        source=venue,
                        base=coin,
                        quote="USD",
                        pair=pair,
                        price=price_d,
                        bid=_sim_decimal(price - spread / 2),
                        ask=_sim_decimal(price + spread / 2),
                        volume_24h=_sim_decimal(self.rng.uniform(1e5, 5e6) / mid),
                        quote_volume_24h=None,
                        exchange_ts=now,
                        received_at=now,
                        transport="sim",
                    )
                )
        return ticks, []

    async def close(self) -> None:
        return None


def _sim_decimal(value: float) -> Decimal:
    return Decimal(f"{value:.10g}")


def build_source(
    name: str, *, rest_url: str | None, timeout_seconds: float, sim_seed: int | None, sim_interval: float
) -> Source:
    if name == "sim":
        return SimSource(name, seed=sim_seed, interval_seconds=sim_interval)
    return CcxtRestSource(name, rest_url=rest_url, timeout_seconds=timeout_seconds)

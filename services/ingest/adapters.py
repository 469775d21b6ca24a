"""Market-data sources. Exchanges are reached through ccxt; ``sim`` is an opt-in offline generator."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import ccxt.async_support as ccxt_async

from shared.messages import TickMessage, to_decimal

# Quotes we take for a tracked coin, in order of preference. Stablecoin quotes stay as sent; pricing
# decides how they count toward USD.
PREFERRED_QUOTES = ("USD", "USDT", "USDC", "EUR", "GBP", "JPY")
SIM_SOURCES = ("sim-alpha", "sim-beta", "sim-gamma")


class SourceError(Exception):
    """A source failed in a way the runner should report; ``kind`` groups errors in counts."""

    def __init__(self, kind: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


@dataclass(slots=True)
class Rejected:
    """A quote the source sent that we refused, with the reason (logged and counted, never stored)."""

    pair: str
    reason: str


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


class CcxtRestSource:
    """Polls an exchange's REST ticker endpoint through ccxt (any exchange ccxt knows, by name)."""

    kind = "rest"

    def __init__(self, name: str, *, rest_url: str | None, timeout_seconds: float) -> None:
        if not hasattr(ccxt_async, name):
            raise ValueError(f"unknown source {name!r}: ccxt has no exchange by that name")
        self.name = name
        self.rest_url = rest_url
        self.timeout_seconds = timeout_seconds
        self.exchange: Any = None
        self.symbols: list[str] = []

    def _build(self) -> Any:
        config: dict[str, Any] = {
            "enableRateLimit": True,
            "timeout": int(self.timeout_seconds * 1000),
            # Currencies need a private endpoint on several exchanges; markets are all we use.
            "has": {"fetchCurrencies": False},
            "options": {"fetchMarkets": {"types": ["spot"]}, "defaultType": "spot"},
        }
        exchange = getattr(ccxt_async, self.name)(config)
        if self.rest_url:
            exchange.urls["api"] = _rebase_tree(exchange.urls["api"], self.rest_url)
        return exchange

    async def open(self, coins: list[str]) -> None:
        if self.exchange is None:
            self.exchange = self._build()
        markets = await self._call(self.exchange.load_markets)
        self.symbols = select_symbols(markets.values(), coins)
        if not self.symbols:
            raise SourceError("no_markets", f"{self.name} lists no spot market for {', '.join(coins)}")

    async def poll(self) -> tuple[list[TickMessage], list[Rejected]]:
        exchange = self.exchange
        if exchange is None:
            raise SourceError("not_open", "source not opened")
        received = datetime.now(UTC)
        if exchange.has.get("fetchTickers"):
            tickers = await self._call(exchange.fetch_tickers, self.symbols)
        else:
            tickers = {s: await self._call(exchange.fetch_ticker, s) for s in self.symbols}
        if not isinstance(tickers, dict):
            raise SourceError("bad_response", f"{self.name} returned {type(tickers).__name__}, not tickers")
        ticks: list[TickMessage] = []
        rejected: list[Rejected] = []
        for symbol in self.symbols:
            ticker = tickers.get(symbol)
            if ticker is None:
                continue
            market = exchange.markets.get(symbol, {})
            try:
                ticks.append(self._to_tick(symbol, market, ticker, received))
            except (ValueError, TypeError, KeyError) as exc:
                rejected.append(Rejected(pair=symbol, reason=str(exc)))
        return ticks, rejected

    def _to_tick(self, symbol: str, market: dict[str, Any], ticker: dict[str, Any], received: datetime) -> TickMessage:
        price = to_decimal(ticker.get("last") if ticker.get("last") is not None else ticker.get("close"))
        if price is None or price <= 0:
            raise ValueError(f"price is {price!r}: a quote needs a positive last price")
        exchange_ts = _ts(ticker.get("timestamp"), received)
        pair = market.get("id") or symbol
        return TickMessage(
            tick_id=tick_id(self.name, str(pair), exchange_ts, price),
            source=self.name,
            base=str(market.get("base") or symbol.split("/")[0]).upper(),
            quote=str(market.get("quote") or symbol.split("/")[1]).upper(),
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
        try:
            return await method(*args)
        except ccxt_async.RateLimitExceeded as exc:
            raise SourceError("rate_limited", _short(exc), retry_after=self._retry_after()) from None
        except ccxt_async.DDoSProtection as exc:
            raise SourceError("rate_limited", _short(exc), retry_after=self._retry_after()) from None
        except ccxt_async.RequestTimeout as exc:
            raise SourceError("timeout", _short(exc)) from None
        except ccxt_async.ExchangeNotAvailable as exc:
            raise SourceError("unavailable", _short(exc)) from None
        except ccxt_async.NetworkError as exc:
            raise SourceError("network", _short(exc)) from None
        except ccxt_async.BaseError as exc:
            raise SourceError("exchange_error", _short(exc)) from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            # ccxt's parsers meet a truncated or reshaped body this way.
            raise SourceError("bad_response", f"unparseable response: {type(exc).__name__}: {exc}") from None

    def _retry_after(self) -> float | None:
        headers = getattr(self.exchange, "last_response_headers", None) or {}
        for key, value in headers.items():
            if key.lower() == "retry-after":
                try:
                    return max(0.0, float(value))
                except ValueError:
                    return None
        return None

    async def close(self) -> None:
        if self.exchange is not None:
            await self.exchange.close()
            self.exchange = None


def _positive_or_none(value: object) -> Decimal | None:
    number = to_decimal(value)
    return number if number is not None and number > 0 else None


def _short(exc: Exception, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def select_symbols(markets: Iterable[dict[str, Any]], coins: list[str]) -> list[str]:
    """For each tracked coin, the active spot markets quoted in a currency we use."""
    wanted = set(coins)
    chosen: list[tuple[int, str]] = []
    for market in markets:
        base, quote = market.get("base"), market.get("quote")
        if base not in wanted or quote not in PREFERRED_QUOTES:
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

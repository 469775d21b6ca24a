"""The adapters behind /api/v3: each reads our own public /api/v1 answers from the owning service, through the
gateway's upstream connection pool with the caller's identity, and restates them in CoinGecko's shapes.
Nothing here computes a price: the numbers are the consolidated prices, candles, market caps and per-source
quotes of /api/v1, only renamed, re-timed (milliseconds) and, where CoinGecko's field is a derived one,
derived in one obvious step (a 24 h volume in coins times the price gives CoinGecko's volume in `vs`).

Coin ids are CoinGecko's: the id CoinGecko's metadata gave a coin (services/ingest/coingecko, exposed by
/api/v1/coins/{symbol} as ``coingecko_id``) wins; else the built-in map of the default coins (so ids work
offline and under ``make demo``); else the lower-cased symbol."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from typing import Any
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from services.gateway.service import Upstreams
from shared.auth import Principal, sign_internal
from shared.logging import CORRELATION_HEADER, get_correlation_id
from shared.settings import Settings
from shared.timeparse import iso_z

# CoinGecko's ids and names of the default coins (COINLYTICS_COINS) and of the quote coins our sources use.
BUILTIN_IDS: dict[str, tuple[str, str]] = {
    "BTC": ("bitcoin", "Bitcoin"),
    "ETH": ("ethereum", "Ethereum"),
    "SOL": ("solana", "Solana"),
    "XRP": ("ripple", "XRP"),
    "ADA": ("cardano", "Cardano"),
    "DOGE": ("dogecoin", "Dogecoin"),
    "LTC": ("litecoin", "Litecoin"),
    "DOT": ("polkadot", "Polkadot"),
    "LINK": ("chainlink", "Chainlink"),
    "AVAX": ("avalanche-2", "Avalanche"),
    "USDT": ("tether", "Tether"),
    "USDC": ("usd-coin", "USDC"),
    "DAI": ("dai", "Dai"),
    "BNB": ("binancecoin", "BNB"),
}
# ISO 4217 names of the currencies the reference rates cover, for /exchange_rates.
FIAT_NAMES: dict[str, str] = {
    "USD": "US Dollar", "EUR": "Euro", "GBP": "British Pound Sterling", "JPY": "Japanese Yen",
    "CHF": "Swiss Franc", "CAD": "Canadian Dollar", "AUD": "Australian Dollar", "NZD": "New Zealand Dollar",
    "CNY": "Chinese Yuan", "HKD": "Hong Kong Dollar", "SGD": "Singapore Dollar", "SEK": "Swedish Krona",
    "NOK": "Norwegian Krone", "DKK": "Danish Krone", "PLN": "Polish Zloty", "CZK": "Czech Koruna",
    "HUF": "Hungarian Forint", "RON": "Romanian Leu", "BGN": "Bulgarian Lev", "ISK": "Icelandic Krona",
    "TRY": "Turkish Lira", "ILS": "Israeli New Shekel", "INR": "Indian Rupee", "IDR": "Indonesian Rupiah",
    "KRW": "South Korean Won", "MXN": "Mexican Peso", "MYR": "Malaysian Ringgit", "PHP": "Philippine Peso",
    "THB": "Thai Baht", "ZAR": "South African Rand", "BRL": "Brazilian Real",
}  # fmt: skip
CATALOGUE_TTL_SECONDS = 60.0
# How soon a catalogue built while some metadata lookups failed is built again.
CATALOGUE_RETRY_SECONDS = 5.0
DETAIL_CONCURRENCY = 8
MAX_CATALOGUE_PAGES = 40
PAGE_SIZE = 250
# The change windows /api/v1/coins computes; CoinGecko's other windows (14d, 30d, 200d, 1y) are null.
CHANGE_FIELDS = {"1h": "change_1h_pct", "24h": "change_24h_pct", "7d": "change_7d_pct"}
PRICE_CHANGE_WINDOWS = ("1h", "24h", "7d", "14d", "30d", "200d", "1y")
# CoinGecko's documented ``interval`` values -> our candle intervals.
CHART_INTERVALS = {"5m": "5m", "5minutely": "5m", "hourly": "1h", "daily": "1d", "1m": "1m"}
OHLC_INTERVALS = {"hourly": "1h", "daily": "1d"}
INTERVAL_MS = {"1m": 60_000, "5m": 300_000, "15m": 900_000, "30m": 1_800_000, "1h": 3_600_000,
               "4h": 14_400_000, "1d": 86_400_000, "4d": 345_600_000}  # fmt: skip
# ``days=max``: as far back as any candle can be (no exchange traded crypto before 2010).
MAX_HISTORY_START = datetime(2010, 1, 1, tzinfo=UTC)
MAX_DAYS = Decimal(9999)


class CompatError(Exception):
    """An answer in CoinGecko's error shape: ``{"error": "..."}`` for a bad request or an unknown coin
    (its 400/404s), ``{"status": {"error_code", "error_message"}}`` for the rest (its 401/429s)."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        if self.status in (400, 404, 422):
            return {"error": self.message}
        return {"status": {"error_code": self.status, "error_message": self.message}}


def bad_request(message: str) -> CompatError:
    return CompatError(400, message)


def coin_not_found() -> CompatError:
    return CompatError(404, "coin not found")


def number(value: Any, precision: int | None = None) -> float | None:
    """A JSON number of ours (read as Decimal) as the float CoinGecko writes, rounded to ``precision``
    decimal places when asked (half-even, on the exact value, before the float)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        exact = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    if not exact.is_finite():
        return None
    if precision is not None:
        # Enough digits for any stored value at 18 places (the default context's 28 are not: a market cap of
        # 1.3e12 at 18 places needs 31 and raised InvalidOperation).
        with localcontext(prec=80), contextlib.suppress(InvalidOperation):
            # Still too many digits: the value is far beyond where decimal places matter; left as it is.
            exact = exact.quantize(Decimal(1).scaleb(-precision), rounding=ROUND_HALF_EVEN)
    as_float = float(exact)
    # Past float's range a Decimal becomes inf, which JSON cannot carry.
    return as_float if math.isfinite(as_float) else None


def parse_precision(raw: str | None) -> int | None:
    """``precision``: ``full`` or 0-18 decimal places (None = as we have it)."""
    if raw is None or raw == "" or raw == "full":
        return None
    if raw.isdigit() and 0 <= int(raw) <= 18:
        return int(raw)
    raise bad_request("invalid precision: use full or 0-18")


def parse_bool(raw: str | bool | None, name: str, default: bool = False) -> bool:
    if isinstance(raw, bool):
        return raw
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise bad_request(f"invalid {name}: use true or false")


def split_list(raw: str | None) -> list[str]:
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


def parse_positive_int(raw: str | int | None, name: str, default: int, maximum: int) -> int:
    if raw is None or raw == "":
        return default
    raw = str(raw)
    if not raw.strip().isdigit() or not 1 <= int(raw) <= maximum:
        raise bad_request(f"invalid {name}: a whole number from 1 to {maximum}")
    return int(raw)


def parse_days(raw: str | None) -> Decimal | None:
    """``days``: a positive number of days or ``max`` (None)."""
    if raw is None or raw.strip() == "":
        raise bad_request("Missing parameter days")
    text = raw.strip().lower()
    if text == "max":
        return None
    try:
        days = Decimal(text)
    except InvalidOperation:
        raise bad_request("invalid days: a number of days or max") from None
    if not days.is_finite() or days <= 0 or days > MAX_DAYS:
        raise bad_request(f"invalid days: more than 0, at most {MAX_DAYS}, or max")
    return days


def parse_moment(raw: str | None, name: str) -> datetime:
    """``from``/``to`` of the range routes: UNIX seconds, or an ISO date (``YYYY-MM-DD`` or with a time),
    read as UTC when it names no offset."""
    if raw is None or raw.strip() == "":
        raise bad_request(f"Missing parameter {name}")
    text = raw.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise bad_request(f"invalid {name}: UNIX seconds or an ISO date") from None
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    if not seconds == seconds or not 0 <= seconds < 32_503_680_000:  # NaN, negative, past year 3000
        raise bad_request(f"invalid {name}: UNIX seconds or an ISO date")
    return datetime.fromtimestamp(seconds, tz=UTC)


def parse_iso(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def iso_ms(value: Any) -> str | None:
    """Our ISO time as CoinGecko writes it: milliseconds and a Z."""
    moment = parse_iso(value)
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def change_amount(price: Decimal | None, pct: Decimal | None) -> Decimal | None:
    """The change in value behind a percent change: now - then, where then = now / (1 + pct/100)."""
    if price is None or pct is None or pct <= -100:
        return None
    return price * pct / (100 + pct)


@dataclass(frozen=True, slots=True)
class CoinRef:
    """A tracked coin as CoinGecko names it."""

    id: str
    symbol: str  # ours, upper-case
    name: str


@dataclass(slots=True)
class Catalogue:
    coins: list[CoinRef]
    by_id: dict[str, CoinRef]
    by_symbol: dict[str, CoinRef]
    at: float


def merge_ohlc(rows: Sequence[Sequence[Any]], bucket_ms: int) -> list[list[Any]]:
    """Candles [start_ms, open, high, low, close] merged into epoch-aligned buckets of ``bucket_ms``."""
    merged: dict[int, list[Any]] = {}
    for start, open_, high, low, close in rows:
        key = start - start % bucket_ms
        current = merged.get(key)
        if current is None:
            merged[key] = [key, open_, high, low, close]
        else:
            current[2] = max(current[2], high)
            current[3] = min(current[3], low)
            current[4] = close
    return [merged[key] for key in sorted(merged)]


def ohlc_plan(days: Decimal | None) -> tuple[str, str]:
    """CoinGecko's automatic OHLC granularity -> (our candle interval to read, the bucket to answer):
    1-2 days 30-minute candles, 3-30 days 4-hourly, 31 days and more (and max) 4-daily."""
    if days is not None and days <= 2:
        return "15m", "30m"
    if days is not None and days <= 30:
        return "4h", "4h"
    return "1d", "4d"


class CompatService:
    """Adapters from our /api/v1 answers to CoinGecko's; one per gateway, on ``app.state.compat``."""

    def __init__(self, settings: Settings, upstreams: Upstreams) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self._catalogue: Catalogue | None = None
        self._catalogue_lock = asyncio.Lock()

    # --- reading our own API ------------------------------------------------------------------------

    async def get(
        self, service: str, path: str, params: dict[str, str], principal: Principal
    ) -> tuple[Any, dict[str, str]]:
        """GET one of our /api/v1 routes from the owning service, signed for the caller as the gateway's
        forwarding signs it; numbers come back as Decimal. A service's error becomes CoinGecko's shape."""
        query = urlencode(params)
        headers = sign_internal(self.upstreams.internal_key, "GET", path, principal, query=query)
        headers[CORRELATION_HEADER] = get_correlation_id() or ""
        # The pool does not decompress (it forwards bodies as they are): ask for an uncompressed one.
        headers["accept-encoding"] = "identity"
        # As encoded here: the signature covers this exact query string, which re-quoting would change.
        url = URL(self.settings.service_url(service) + path + (f"?{query}" if query else ""), encoded=True)
        try:
            async with self.upstreams.session.get(url, headers=headers, allow_redirects=False) as response:
                body = await response.read()
                status = response.status
                answer_headers = {k.lower(): v for k, v in response.headers.items()}
        except TimeoutError:
            raise CompatError(504, f"the {service} service did not answer in time") from None
        except aiohttp.ClientError:
            raise CompatError(502, f"the {service} service is unavailable") from None
        try:
            payload = json.loads(body, parse_float=Decimal) if body else None
        except ValueError:
            raise CompatError(502, f"the {service} service gave an unreadable answer") from None
        if status >= 400:
            raise upstream_error(status, payload, answer_headers)
        return payload, answer_headers

    async def catalogue(self, principal: Principal) -> Catalogue:
        """Every tracked coin with its CoinGecko id, kept for a minute (ids and names rarely change)."""
        cached = self._catalogue
        if cached is not None and time.monotonic() - cached.at < CATALOGUE_TTL_SECONDS:
            return cached
        async with self._catalogue_lock:
            cached = self._catalogue
            if cached is not None and time.monotonic() - cached.at < CATALOGUE_TTL_SECONDS:
                return cached
            rows = await self.coin_rows("USD", principal)
            ids, failed = await self._metadata_ids(
                [r["symbol"] for r in rows if r["symbol"] not in BUILTIN_IDS], principal
            )
            # A lookup that failed this time keeps the id the coin had, rather than answering to its symbol
            # for a minute (clients asking for "avalanche-2" would get 404 meanwhile).
            known = {c.symbol: c.id for c in cached.coins} if cached is not None else {}
            coins: list[CoinRef] = []
            taken: set[str] = set()
            for row in rows:
                symbol = row["symbol"]
                builtin = BUILTIN_IDS.get(symbol)
                coin_id = (
                    ids.get(symbol)
                    or (known.get(symbol) if symbol in failed else None)
                    or (builtin[0] if builtin else symbol.lower())
                )
                if coin_id in taken:  # two coins can never answer to one id
                    coin_id = symbol.lower()
                taken.add(coin_id)
                name = row.get("name") or (builtin[1] if builtin else symbol)
                coins.append(CoinRef(id=coin_id, symbol=symbol, name=name))
            catalogue = Catalogue(
                coins=coins,
                by_id={c.id: c for c in coins},
                by_symbol={c.symbol: c for c in coins},
                # Built with failed lookups: asked again soon instead of kept for the whole minute.
                at=time.monotonic() - (CATALOGUE_TTL_SECONDS - CATALOGUE_RETRY_SECONDS if failed else 0),
            )
            self._catalogue = catalogue
            return catalogue

    async def _metadata_ids(self, symbols: Sequence[str], principal: Principal) -> tuple[dict[str, str], set[str]]:
        """CoinGecko ids from the coins' stored metadata, and the symbols whose lookup failed."""
        limit = asyncio.Semaphore(DETAIL_CONCURRENCY)

        failed: set[str] = set()

        async def one(symbol: str) -> tuple[str, str | None]:
            async with limit:
                try:
                    detail, _ = await self.get("pricing", f"/api/v1/coins/{symbol}", {"vs": "USD"}, principal)
                except CompatError:
                    failed.add(symbol)
                    return symbol, None
            coin_id = detail.get("coingecko_id") if isinstance(detail, dict) else None
            return symbol, coin_id if isinstance(coin_id, str) and coin_id else None

        found = await asyncio.gather(*(one(s) for s in symbols))
        return {symbol: coin_id for symbol, coin_id in found if coin_id}, failed

    async def coin_rows(self, vs: str, principal: Principal) -> list[dict[str, Any]]:
        """Every row of /api/v1/coins in ``vs`` (market-cap order), page by page."""
        rows: list[dict[str, Any]] = []
        for page in range(1, MAX_CATALOGUE_PAGES + 1):
            chunk, headers = await self.get(
                "pricing", "/api/v1/coins", {"vs": vs, "page": str(page), "per_page": str(PAGE_SIZE)}, principal
            )
            if not isinstance(chunk, list):
                break
            rows.extend(r for r in chunk if isinstance(r, dict) and isinstance(r.get("symbol"), str))
            total = headers.get("x-total-count", "")
            if len(chunk) < PAGE_SIZE or (total.isdigit() and len(rows) >= int(total)):
                break
        return rows

    async def resolve_coin(self, coin_id: str, principal: Principal) -> CoinRef:
        coin = (await self.catalogue(principal)).by_id.get(coin_id.strip().lower())
        if coin is None:
            raise coin_not_found()
        return coin

    def supported_vs(self) -> list[str]:
        """The currencies pricing publishes prices in (COINLYTICS_VS_CURRENCIES), CoinGecko-style lower-case."""
        return [vs.lower() for vs in self.settings.vs_currencies]

    def check_vs(self, raw: str | None) -> str:
        if raw is None or raw.strip() == "":
            raise bad_request("Missing parameter vs_currency")
        vs = raw.strip().upper()
        if vs.lower() not in self.supported_vs():
            raise bad_request("invalid vs_currency")
        return vs

    # --- /simple ------------------------------------------------------------------------------------

    async def simple_price(
        self,
        principal: Principal,
        *,
        ids: list[str],
        symbols: list[str],
        vs_currencies: list[str],
        market_cap: bool,
        volume: bool,
        change: bool,
        last_updated: bool,
        precision: int | None,
    ) -> dict[str, dict[str, Any]]:
        catalogue = await self.catalogue(principal)
        wanted: list[tuple[str, CoinRef]] = []  # (the key the caller asked by, the coin)
        for raw in ids:
            coin = catalogue.by_id.get(raw.lower())
            if coin is not None:
                wanted.append((coin.id, coin))
        for raw in symbols:
            coin = catalogue.by_symbol.get(raw.upper())
            if coin is not None:
                wanted.append((raw.lower(), coin))
        currencies = [v.upper() for v in vs_currencies if v.lower() in self.supported_vs()]
        # CoinGecko leaves unknown ids and currencies out rather than failing the whole request.
        if not wanted:
            return {}
        if not currencies:
            return {key: {} for key, _ in wanted}
        flags = (("market_cap", market_cap), ("volume_24h", volume), ("change_24h", change))
        extras = [name for name, on in flags if on]
        params = {"symbols": ",".join(dict.fromkeys(c.symbol for _, c in wanted)), "vs": ",".join(currencies)}
        if extras:
            params["include"] = ",".join(extras)
        table, _ = await self.get("pricing", "/api/v1/prices", params, principal)
        out: dict[str, dict[str, Any]] = {}
        for key, coin in wanted:
            entry: dict[str, Any] = {}
            newest: datetime | None = None
            for vs in currencies:
                found = (table.get(coin.symbol) or {}).get(vs) if isinstance(table, dict) else None
                if not isinstance(found, dict):
                    continue
                code = vs.lower()
                price = found.get("price")
                entry[code] = number(price, precision)
                if market_cap:
                    entry[f"{code}_market_cap"] = number(found.get("market_cap"), precision)
                if volume:
                    vol = found.get("volume_24h")
                    # Ours is in coins; CoinGecko's is in the currency.
                    amount = vol * price if vol is not None and price is not None else None
                    entry[f"{code}_24h_vol"] = number(amount, precision)
                if change:
                    entry[f"{code}_24h_change"] = number(found.get("change_24h"))
                moment = parse_iso(found.get("last_updated"))
                if moment is not None and (newest is None or moment > newest):
                    newest = moment
            if last_updated:
                entry["last_updated_at"] = int(newest.timestamp()) if newest is not None else None
            out[key] = entry
        return out

    # --- /coins -------------------------------------------------------------------------------------

    async def coins_list(self, principal: Principal, include_platform: bool) -> list[dict[str, Any]]:
        catalogue = await self.catalogue(principal)
        out: list[dict[str, Any]] = []
        for coin in sorted(catalogue.coins, key=lambda c: c.id):
            item: dict[str, Any] = {"id": coin.id, "symbol": coin.symbol.lower(), "name": coin.name}
            if include_platform:
                item["platforms"] = {}  # we track no token contracts
            out.append(item)
        return out

    async def markets(
        self,
        principal: Principal,
        *,
        vs: str,
        ids: list[str],
        symbols: list[str],
        order: str,
        per_page: int,
        page: int,
        sparkline: bool,
        windows: list[str],
        precision: int | None,
    ) -> list[dict[str, Any]]:
        catalogue = await self.catalogue(principal)
        rows = await self.coin_rows(vs, principal)
        ranks = {row["symbol"]: i for i, row in enumerate((r for r in rows if r.get("market_cap") is not None), 1)}
        refs = [(catalogue.by_symbol.get(row["symbol"]), row) for row in rows]
        chosen = [(ref, row) for ref, row in refs if ref is not None]
        if ids or symbols:
            wanted_ids = {i.lower() for i in ids}
            wanted_symbols = {s.upper() for s in symbols}
            chosen = [(ref, row) for ref, row in chosen if ref.id in wanted_ids or ref.symbol in wanted_symbols]
        chosen = sort_markets(chosen, order)
        chosen = chosen[(page - 1) * per_page : page * per_page]
        details = await self._details([ref.symbol for ref, _ in chosen], vs, principal)
        sparks = await self._sparklines([ref.symbol for ref, _ in chosen], vs, principal) if sparkline else {}
        out = []
        for ref, row in chosen:
            detail = details.get(ref.symbol) or {}
            price = row.get("price")
            pct_24h = row.get("change_24h_pct")
            cap = row.get("market_cap")
            vol = row.get("volume_24h")
            item: dict[str, Any] = {
                "id": ref.id,
                "symbol": ref.symbol.lower(),
                "name": ref.name,
                "image": None,
                "current_price": number(price, precision),
                "market_cap": number(cap, precision),
                "market_cap_rank": ranks.get(ref.symbol),
                "fully_diluted_valuation": None,
                "total_volume": number(vol * price if vol is not None and price is not None else None, precision),
                "high_24h": None,
                "low_24h": None,
                "price_change_24h": number(change_amount(price, pct_24h), precision),
                "price_change_percentage_24h": number(pct_24h),
                # Our market cap is supply x price: over 24 h it moves by the price's percentage.
                "market_cap_change_24h": number(change_amount(cap, pct_24h), precision),
                "market_cap_change_percentage_24h": number(pct_24h) if cap is not None else None,
                "circulating_supply": number(detail.get("circulating_supply")),
                "total_supply": number(detail.get("total_supply")),
                "max_supply": None,
                "ath": None,
                "ath_change_percentage": None,
                "ath_date": None,
                "atl": None,
                "atl_change_percentage": None,
                "atl_date": None,
                "roi": None,
                "last_updated": iso_ms(row.get("last_updated")),
            }
            if sparkline:
                item["sparkline_in_7d"] = {"price": sparks.get(ref.symbol, [])}
            for window in windows:
                field = CHANGE_FIELDS.get(window)
                item[f"price_change_percentage_{window}_in_currency"] = number(row.get(field)) if field else None
            out.append(item)
        return out

    async def _details(self, symbols: Sequence[str], vs: str, principal: Principal) -> dict[str, dict[str, Any]]:
        limit = asyncio.Semaphore(DETAIL_CONCURRENCY)

        async def one(symbol: str) -> tuple[str, dict[str, Any]]:
            async with limit:
                try:
                    detail, _ = await self.get("pricing", f"/api/v1/coins/{symbol}", {"vs": vs}, principal)
                except CompatError:
                    return symbol, {}
            return symbol, detail if isinstance(detail, dict) else {}

        return dict(await asyncio.gather(*(one(s) for s in symbols)))

    async def _sparklines(self, symbols: Sequence[str], vs: str, principal: Principal) -> dict[str, list[float]]:
        end = datetime.now(UTC)
        start = end - timedelta(days=7)

        async def one(symbol: str) -> tuple[str, list[float]]:
            try:
                candles, _ = await self.candles(symbol, vs, start, end, "1h", principal)
            except CompatError:
                return symbol, []
            return symbol, [v for c in candles if (v := number(c.get("close"))) is not None]

        return dict(await asyncio.gather(*(one(s) for s in symbols)))

    async def coin(
        self,
        principal: Principal,
        coin_id: str,
        *,
        market_data: bool,
        tickers: bool,
        localization: bool,
        sparkline: bool,
    ) -> dict[str, Any]:
        ref = await self.resolve_coin(coin_id, principal)
        currencies = [vs.upper() for vs in self.supported_vs()]
        details = await asyncio.gather(
            *(self.get("pricing", f"/api/v1/coins/{ref.symbol}", {"vs": vs}, principal) for vs in currencies)
        )
        by_vs = {vs: d for vs, (d, _) in zip(currencies, details, strict=True) if isinstance(d, dict)}
        usd = by_vs.get("USD") or next(iter(by_vs.values()), {})
        body: dict[str, Any] = {
            "id": ref.id,
            "symbol": ref.symbol.lower(),
            "name": ref.name,
            "web_slug": ref.id,
            "asset_platform_id": None,
            "platforms": {},
            "detail_platforms": {},
            "block_time_in_minutes": None,
            "hashing_algorithm": None,
            "categories": [],
            "preview_listing": False,
            "public_notice": None,
            "additional_notices": [],
            "description": {},
            "links": None,
            "image": None,
            "country_origin": None,
            "genesis_date": None,
            "sentiment_votes_up_percentage": None,
            "sentiment_votes_down_percentage": None,
            "watchlist_portfolio_users": None,
            "market_cap_rank": None,
            "status_updates": [],
            "last_updated": iso_ms(usd.get("last_updated")),
        }
        if localization:
            body["localization"] = {"en": ref.name}
        if market_data:
            body["market_data"] = coin_market_data(by_vs, usd, sparkline=None)
            if sparkline:
                sparks = await self._sparklines([ref.symbol], "USD", principal)
                body["market_data"]["sparkline_7d"] = {"price": sparks.get(ref.symbol, [])}
        if tickers:
            body["tickers"] = (await self.tickers(principal, ref.id))["tickers"]
        return body

    async def tickers(self, principal: Principal, coin_id: str) -> dict[str, Any]:
        ref = await self.resolve_coin(coin_id, principal)
        comparison, _ = await self.get("pricing", f"/api/v1/prices/{ref.symbol}/sources", {"vs": "USD"}, principal)
        catalogue = await self.catalogue(principal)
        out = []
        for quote in comparison.get("sources", []) if isinstance(comparison, dict) else []:
            status = quote.get("status")
            price_usd = quote.get("price")
            volume = quote.get("volume_24h")
            bid, ask = quote.get("bid"), quote.get("ask")
            target = str(quote.get("quote") or "")
            target_ref = catalogue.by_symbol.get(target) or (
                CoinRef(BUILTIN_IDS[target][0], target, BUILTIN_IDS[target][1]) if target in BUILTIN_IDS else None
            )
            spread = (ask - bid) / ask * 100 if bid is not None and ask is not None and ask > 0 else None
            item: dict[str, Any] = {
                "base": ref.symbol,
                "target": target,
                "market": {
                    "name": quote.get("source"),
                    "identifier": quote.get("source"),
                    "has_trading_incentive": False,
                },
                "last": number(quote.get("quoted_price")),
                "volume": number(volume),
                "converted_last": {"btc": None, "eth": None, "usd": number(price_usd)},
                "converted_volume": {
                    "btc": None,
                    "eth": None,
                    "usd": number(volume * price_usd if volume is not None and price_usd is not None else None),
                },
                "trust_score": None,
                "bid_ask_spread_percentage": number(spread),
                "timestamp": iso_ms(quote.get("timestamp")),
                "last_traded_at": iso_ms(quote.get("timestamp")),
                "last_fetch_at": iso_ms(quote.get("received_at")),
                "is_anomaly": status == "outlier",
                "is_stale": status == "stale",
                "trade_url": None,
                "token_info_url": None,
                "coin_id": ref.id,
                # Ours, beside CoinGecko's two flags: used, stale or outlier in the consolidated price.
                "coinlytics_status": status,
                "coinlytics_pair": quote.get("pair"),
            }
            if target_ref is not None:
                item["target_coin_id"] = target_ref.id
            out.append(item)
        return {"name": ref.name, "tickers": out}

    # --- charts -------------------------------------------------------------------------------------

    async def candles(
        self, symbol: str, vs: str, start: datetime, end: datetime, interval: str, principal: Principal
    ) -> tuple[list[dict[str, Any]], str]:
        """/api/v1's candles and the interval it served (what ``auto`` chose, in its X-Interval header)."""
        rows, headers = await self.get(
            "pricing",
            f"/api/v1/prices/{symbol}/history",
            {"vs": vs, "start": iso_z(start), "end": iso_z(end), "interval": interval},
            principal,
        )
        served = headers.get("x-interval", interval)
        return ([r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []), served

    async def market_chart(
        self,
        principal: Principal,
        coin_id: str,
        *,
        vs: str,
        start: datetime,
        end: datetime,
        interval: str,
        precision: int | None,
    ) -> dict[str, list[list[float | int | None]]]:
        """prices, market_caps and total_volumes: our candles' closes at each candle's end (the moment the
        close was the price; capped at now for the current one), CoinGecko's granularity by our `auto`."""
        ref = await self.resolve_coin(coin_id, principal)
        history = self.candles(ref.symbol, vs, start, end, interval, principal)
        current = self.get("pricing", f"/api/v1/coins/{ref.symbol}", {"vs": vs}, principal)
        ((rows, served), (detail, _)) = await asyncio.gather(history, current)
        step = INTERVAL_MS.get(served, 0)
        supply = implied_supply(detail)
        now_ms = ms(datetime.now(UTC))
        prices: list[list[float | int | None]] = []
        caps: list[list[float | int | None]] = []
        for row in rows:
            moment = parse_iso(row.get("t"))
            close = row.get("close")
            if moment is None or close is None:
                continue
            at = min(ms(moment) + step, now_ms)
            prices.append([at, number(close, precision)])
            if supply is not None:
                caps.append([at, number(close * supply, precision)])
        volumes: list[list[float | int | None]] = []
        vol, price = detail.get("volume_24h"), detail.get("price")
        if prices and vol is not None and price is not None:
            # Sources report a rolling 24 h volume only now: one point, at the newest price's time.
            volumes.append([prices[-1][0], number(vol * price, precision)])
        return {"prices": prices, "market_caps": caps, "total_volumes": volumes}

    async def ohlc(
        self, principal: Principal, coin_id: str, *, vs: str, days: Decimal | None, interval: str | None,
        precision: int | None,
    ) -> list[list[float | int | None]]:  # fmt: skip
        """[close time ms, open, high, low, close], CoinGecko's OHLC granularity unless ``interval`` asks."""
        ref = await self.resolve_coin(coin_id, principal)
        end = datetime.now(UTC)
        start = MAX_HISTORY_START if days is None else end - timedelta(days=float(days))
        read, bucket = (interval, interval) if interval else ohlc_plan(days)
        rows, _ = await self.candles(ref.symbol, vs, start, end, read, principal)
        raw = []
        for row in rows:
            moment = parse_iso(row.get("t"))
            values = [row.get(k) for k in ("open", "high", "low", "close")]
            if moment is None or any(v is None for v in values):
                continue
            raw.append([ms(moment), *values])
        out: list[list[float | int | None]] = []
        for start_ms, *ohlc in merge_ohlc(raw, INTERVAL_MS[bucket]):
            # CoinGecko stamps an OHLC candle with its close time.
            out.append([start_ms + INTERVAL_MS[bucket], *(number(v, precision) for v in ohlc)])
        return out

    # --- /exchange_rates ----------------------------------------------------------------------------

    async def exchange_rates(self, principal: Principal) -> dict[str, Any]:
        table, _ = await self.get("conversion", "/api/v1/rates", {"base": "BTC"}, principal)
        catalogue = await self.catalogue(principal)
        rates: dict[str, Any] = {"btc": {"name": "Bitcoin", "unit": "BTC", "value": 1.0, "type": "crypto"}}
        for code, entry in (table.get("rates") or {}).items() if isinstance(table, dict) else []:
            if not isinstance(entry, dict) or code == "BTC":
                continue
            kind = "fiat" if entry.get("kind") == "fiat" else "crypto"
            ref = catalogue.by_symbol.get(code)
            builtin = BUILTIN_IDS.get(code, ("", code))[1]
            name = FIAT_NAMES.get(code) if kind == "fiat" else (ref.name if ref else builtin)
            rates[code.lower()] = {"name": name or code, "unit": code, "value": number(entry.get("rate")), "type": kind}
        return {"rates": rates}


def implied_supply(detail: Any) -> Decimal | None:
    """The supply our market cap stands for: CoinGecko's circulating supply, or (when the cap was restated
    from CoinGecko's USD cap) cap / price. A past market cap is this supply times the past price."""
    if not isinstance(detail, dict):
        return None
    supply = detail.get("circulating_supply")
    if detail.get("market_cap_method") == "circulating_supply x price" and supply:
        return Decimal(supply)
    cap, price = detail.get("market_cap"), detail.get("price")
    if cap is not None and price:
        return Decimal(cap) / Decimal(price)
    return None


def coin_market_data(by_vs: dict[str, dict[str, Any]], usd: dict[str, Any], sparkline: Any) -> dict[str, Any]:
    def per_vs(pick: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        for vs, detail in by_vs.items():
            value = number(pick(detail))
            if value is not None:
                out[vs.lower()] = value
        return out

    def volume(detail: dict[str, Any]) -> Any:
        vol, price = detail.get("volume_24h"), detail.get("price")
        return vol * price if vol is not None and price is not None else None

    cap_usd = usd.get("market_cap")
    pct_24h = usd.get("change_24h_pct")
    data: dict[str, Any] = {
        "current_price": per_vs(lambda d: d.get("price")),
        "total_value_locked": None,
        "mcap_to_tvl_ratio": None,
        "fdv_to_tvl_ratio": None,
        "roi": None,
        "ath": {},
        "ath_change_percentage": {},
        "ath_date": {},
        "atl": {},
        "atl_change_percentage": {},
        "atl_date": {},
        "market_cap": per_vs(lambda d: d.get("market_cap")),
        "market_cap_rank": None,
        "fully_diluted_valuation": {},
        "market_cap_fdv_ratio": None,
        "total_volume": per_vs(volume),
        "high_24h": {},
        "low_24h": {},
        "price_change_24h": number(change_amount(usd.get("price"), pct_24h)),
        "price_change_percentage_24h": number(pct_24h),
        "price_change_percentage_7d": number(usd.get("change_7d_pct")),
        "price_change_percentage_14d": None,
        "price_change_percentage_30d": None,
        "price_change_percentage_60d": None,
        "price_change_percentage_200d": None,
        "price_change_percentage_1y": None,
        "market_cap_change_24h": number(change_amount(cap_usd, pct_24h)),
        "market_cap_change_percentage_24h": number(pct_24h) if cap_usd is not None else None,
        "price_change_24h_in_currency": per_vs(lambda d: change_amount(d.get("price"), d.get("change_24h_pct"))),
        "price_change_percentage_1h_in_currency": per_vs(lambda d: d.get("change_1h_pct")),
        "price_change_percentage_24h_in_currency": per_vs(lambda d: d.get("change_24h_pct")),
        "price_change_percentage_7d_in_currency": per_vs(lambda d: d.get("change_7d_pct")),
        "market_cap_change_24h_in_currency": per_vs(
            lambda d: change_amount(d.get("market_cap"), d.get("change_24h_pct"))
        ),
        "market_cap_change_percentage_24h_in_currency": per_vs(
            lambda d: d.get("change_24h_pct") if d.get("market_cap") is not None else None
        ),
        "total_supply": number(usd.get("total_supply")),
        "max_supply": None,
        "circulating_supply": number(usd.get("circulating_supply")),
        "last_updated": iso_ms(usd.get("last_updated")),
    }
    return data


def sort_markets(chosen: list[tuple[CoinRef, dict[str, Any]]], order: str) -> list[tuple[CoinRef, dict[str, Any]]]:
    """CoinGecko's ``order`` values; coins without the value sort last either way."""
    field, _, direction = order.rpartition("_")
    descending = direction == "desc"
    if field == "id":
        return sorted(chosen, key=lambda pair: pair[0].id, reverse=descending)
    key = {"market_cap": "market_cap", "volume": "volume_24h"}[field]

    def value(pair: tuple[CoinRef, dict[str, Any]]) -> Decimal:
        row = pair[1]
        amount = row.get(key)
        if amount is None:
            return Decimal(0)
        # Volumes compare in the currency, as CoinGecko's total_volume does.
        return Decimal(amount) * Decimal(row.get("price") or 0) if key == "volume_24h" else Decimal(amount)

    known = [p for p in chosen if p[1].get(key) is not None]
    unknown = [p for p in chosen if p[1].get(key) is None]
    return sorted(known, key=value, reverse=descending) + unknown


MARKET_ORDERS = ("market_cap_desc", "market_cap_asc", "volume_desc", "volume_asc", "id_asc", "id_desc")


def upstream_error(status: int, payload: Any, headers: dict[str, str]) -> CompatError:
    """One of our error bodies as CoinGecko's: an unknown coin is its 404, an unknown currency or a bad
    parameter its 400; the rest keep their status (and Retry-After)."""
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if code == "unknown_symbol":
        return coin_not_found()
    if code == "unknown_currency":
        return bad_request("invalid vs_currency")
    if status in (400, 422):
        return bad_request(str(message or "invalid parameter"))
    passed = {"Retry-After": headers["retry-after"]} if "retry-after" in headers else {}
    return CompatError(status, str(message or "upstream error"), headers=passed)


def lower_all(values: Iterable[str]) -> list[str]:
    return [v.lower() for v in values]

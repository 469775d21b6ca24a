"""A small aiohttp client for CoinGecko's ``/coins/markets`` and the parser of its rows."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp

from shared.http import parse_retry_after

DEFAULT_REST_URL = "https://api.coingecko.com/api/v3"
# /coins/markets answers at most 250 rows a page; asking for more ids than that in one call loses rows.
MAX_IDS_PER_CALL = 250
MAX_BODY_BYTES = 8 * 1024 * 1024
USER_AGENT = "coinlytics/0.1 (+self-hosted market data)"


class CoinGeckoError(Exception):
    """A failed call; ``kind`` names the failure for the error log and health counters."""

    def __init__(self, kind: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class MarketRow:
    """One coin of a ``/coins/markets`` answer, with the fields this project keeps."""

    id: str
    symbol: str
    name: str | None
    market_cap_usd: Decimal | None
    circulating_supply: Decimal | None
    total_supply: Decimal | None
    market_cap_rank: int | None


def _number(value: Any, *, positive: bool = False) -> Decimal | None:
    """A JSON number as Decimal; null, non-numbers, NaN/inf and negatives become None
    (and zero too with ``positive``: CoinGecko writes 0 for a market cap it does not know)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    if not number.is_finite() or number < 0 or (positive and number == 0):
        return None
    return number


def parse_markets(payload: Any) -> list[MarketRow]:
    """Rows of a ``/coins/markets`` answer; entries without an id or symbol are skipped."""
    if not isinstance(payload, list):
        raise CoinGeckoError("bad_response", f"expected a JSON array of coins, got {type(payload).__name__}")
    rows: list[MarketRow] = []
    for item in payload:
        if not isinstance(item, dict):
            continue
        coin_id, symbol = item.get("id"), item.get("symbol")
        if not isinstance(coin_id, str) or not isinstance(symbol, str) or not coin_id or not symbol:
            continue
        name = item.get("name")
        rank = item.get("market_cap_rank")
        rows.append(
            MarketRow(
                id=coin_id,
                symbol=symbol.upper(),
                name=name[:100] if isinstance(name, str) and name else None,
                market_cap_usd=_number(item.get("market_cap"), positive=True),
                circulating_supply=_number(item.get("circulating_supply")),
                total_supply=_number(item.get("total_supply")),
                market_cap_rank=int(rank) if isinstance(rank, int | Decimal) and rank > 0 else None,
            )
        )
    return rows


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def decode_json(body: bytes) -> Any:
    """JSON with every number as Decimal (no binary float ever holds a market cap)."""
    try:
        return json.loads(body, parse_float=Decimal, parse_int=Decimal, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CoinGeckoError("bad_response", f"invalid JSON ({len(body)} bytes): {exc}") from None


class CoinGeckoClient:
    """Calls spaced at least ``min_spacing`` seconds apart, whatever the caller does."""

    def __init__(
        self,
        base_url: str | None,
        *,
        timeout_seconds: float = 10.0,
        min_spacing: float = 2.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = (base_url or DEFAULT_REST_URL).rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.min_spacing = min_spacing
        self._session = session
        self._owns_session = session is None
        self._last_call = -math.inf
        self._lock = asyncio.Lock()
        self.calls = 0

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, headers={"Accept": "application/json", "User-Agent": USER_AGENT}
            )
            self._owns_session = True
        return self._session

    async def markets(self, *, ids: Sequence[str] = (), symbols: Sequence[str] = ()) -> list[MarketRow]:
        """``/coins/markets`` in USD for the given CoinGecko ids, or (lookup) for ticker symbols, where
        CoinGecko answers the top-ranked coin of each symbol."""
        params = {"vs_currency": "usd", "per_page": str(MAX_IDS_PER_CALL), "page": "1"}
        if ids:
            params["ids"] = ",".join(ids)
        elif symbols:
            params["symbols"] = ",".join(s.lower() for s in symbols)
        else:
            return []
        return parse_markets(await self.get_json("/coins/markets", params))

    async def get_json(self, path: str, params: dict[str, str]) -> Any:
        async with self._lock:
            wait = self._last_call + self.min_spacing - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_call = time.monotonic()
            self.calls += 1
            try:
                async with self._client().get(self.base_url + path, params=params) as response:
                    body = await response.content.read(MAX_BODY_BYTES + 1)
                    status, headers = response.status, response.headers
            except TimeoutError:
                raise CoinGeckoError("timeout", f"no answer within {self.timeout.total}s") from None
            except aiohttp.ClientError as exc:
                raise CoinGeckoError("network", f"{type(exc).__name__}: {exc}") from None
        if len(body) > MAX_BODY_BYTES:
            raise CoinGeckoError("bad_response", f"answer larger than {MAX_BODY_BYTES} bytes")
        if status == 429:
            raise CoinGeckoError(
                "rate_limited",
                f"HTTP 429: {_error_message(body)}",
                retry_after=parse_retry_after(headers.get("Retry-After")),
            )
        if status >= 500:
            raise CoinGeckoError(
                "unavailable",
                f"HTTP {status}: {_error_message(body)}",
                retry_after=parse_retry_after(headers.get("Retry-After")),
            )
        if status >= 400:
            raise CoinGeckoError("bad_request", f"HTTP {status}: {_error_message(body)}")
        payload = decode_json(body)
        # CoinGecko has answered rate limiting with a 200 and an error object; it is still a 429.
        code = _status_code(payload)
        if code == 429:
            raise CoinGeckoError("rate_limited", f"rate limited: {_error_message(body)}", retry_after=None)
        if code is not None:
            raise CoinGeckoError("bad_response", f"error {code}: {_error_message(body)}")
        return payload


def _status_code(payload: Any) -> int | None:
    if isinstance(payload, dict) and isinstance(payload.get("status"), dict):
        code = payload["status"].get("error_code")
        if isinstance(code, int | Decimal):
            return int(code)
    return None


def _error_message(body: bytes) -> str:
    """CoinGecko's own error text when the body carries one, else the start of the body."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:200].decode("utf-8", "replace") or "(empty body)"
    if isinstance(payload, dict):
        status = payload.get("status")
        if isinstance(status, dict) and isinstance(status.get("error_message"), str):
            return str(status["error_message"])[:500]
        if isinstance(payload.get("error"), str):
            return str(payload["error"])[:500]
    return body[:200].decode("utf-8", "replace")

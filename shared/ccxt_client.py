"""The one ccxt client configuration: ingest's REST sources and pricing's candle backfill build their exchange
objects here, so both reach an exchange (and a mirror of it) the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ccxt.async_support as ccxt_async

from shared.http import parse_retry_after, rebase_url


def has_exchange(ccxt_id: str) -> bool:
    return hasattr(ccxt_async, ccxt_id)


def rebase_api_urls(node: Any, base: str) -> Any:
    """Every URL in ccxt's ``urls['api']`` tree pointed at ``base``, keeping each endpoint's path."""
    if isinstance(node, str) and node.startswith(("http://", "https://")):
        return rebase_url(node, base)
    if isinstance(node, dict):
        return {key: rebase_api_urls(value, base) for key, value in node.items()}
    return node


def build_exchange(
    ccxt_id: str,
    *,
    timeout_seconds: float,
    rest_url: str | None,
    rate_limit_ms: float | None = None,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """A ccxt async exchange with its rate limiter on, spot markets only, and its REST API rebased onto
    ``rest_url`` (COINLYTICS_SOURCE_<NAME>_REST_URL) when one is given."""
    config: dict[str, Any] = {
        "enableRateLimit": True,
        "timeout": int(timeout_seconds * 1000),
        # Currencies need a private endpoint on several exchanges; markets are all we use.
        "has": {"fetchCurrencies": False},
        "options": {"fetchMarkets": {"types": ["spot"]}, "defaultType": "spot"},
    }
    if rate_limit_ms is not None:
        config["rateLimit"] = rate_limit_ms
    exchange = getattr(ccxt_async, ccxt_id)(config)
    if options:
        exchange.options = exchange.deep_extend(exchange.options, dict(options))
    if rest_url:
        exchange.urls["api"] = rebase_api_urls(exchange.urls["api"], rest_url)
    # The Retry-After of a 429/418 is read from the last response's headers.
    exchange.enableLastResponseHeaders = True
    return exchange


def response_retry_after(exchange: Any) -> float | None:
    """The Retry-After of the exchange's last response, in seconds (see shared.http.parse_retry_after)."""
    headers = getattr(exchange, "last_response_headers", None) or {}
    for key, value in headers.items():
        if str(key).lower() == "retry-after":
            return parse_retry_after(str(value))
    return None

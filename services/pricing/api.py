"""Routes of the pricing service."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Path, Query, Request

from services.pricing import repository
from services.pricing.coins.service import CoinsService
from services.pricing.consolidation import USD_STABLECOINS
from services.pricing.consolidation import votes as source_votes
from services.pricing.schemas import PricesOut, SourcesOut
from services.pricing.service import PricingService
from shared.db import transaction
from shared.errors import NoFreshData, UnknownCurrency, UnknownSymbol, ValidationFailed, error_responses
from shared.responses import DecimalJSONResponse
from shared.service_app import get_resources
from shared.validation import SYMBOL_PATTERN, SYMBOL_RE, choice_list_pattern, symbol_list_pattern

router = APIRouter(tags=["market data"])

INCLUDABLE = ("market_cap", "volume_24h", "change_24h")
MAX_SYMBOLS = 100
MAX_CURRENCIES = 20


def parse_symbols(raw: str, name: str, *, limit: int = MAX_SYMBOLS) -> list[str]:
    items = [part.strip().upper() for part in raw.split(",") if part.strip()]
    if not items:
        raise ValidationFailed(f"{name}: give at least one symbol, e.g. {name}=BTC,ETH")
    if len(items) > limit:
        raise ValidationFailed(f"{name}: at most {limit} symbols per request")
    bad = [s for s in items if not SYMBOL_RE.match(s)]
    if bad:
        raise ValidationFailed(f"{name}: not a symbol: {', '.join(bad[:5])}", details={"invalid": bad})
    return list(dict.fromkeys(items))


@router.get(
    "/api/v1/prices",
    response_model=PricesOut,
    summary="Consolidated prices of coins in one or more currencies",
    description="Each price is the volume-weighted mean of the fresh sources after outlier rejection. "
    "Example: `/api/v1/prices?symbols=BTC,ETH&vs=USD,EUR&include=volume_24h`.",
    responses=error_responses(404, 422, 503),
)
async def get_prices(
    request: Request,
    symbols: str = Query(
        description=f"comma-separated coin symbols (letters and digits, any case), at most {MAX_SYMBOLS}",
        pattern=symbol_list_pattern(MAX_SYMBOLS),
        examples=["BTC,ETH"],
    ),
    vs: str = Query(
        default="USD",
        description=f"comma-separated currencies, at most {MAX_CURRENCIES}",
        pattern=symbol_list_pattern(MAX_CURRENCIES),
        examples=["USD,EUR"],
    ),
    include: str | None = Query(
        default=None,
        description="extra fields, comma-separated: market_cap, volume_24h, change_24h",
        pattern=choice_list_pattern(INCLUDABLE),
        examples=["market_cap,change_24h"],
    ),
) -> DecimalJSONResponse:
    bases = parse_symbols(symbols, "symbols")
    currencies = parse_symbols(vs, "vs", limit=MAX_CURRENCIES)
    extras = [part.strip() for part in (include or "").split(",") if part.strip()]
    unknown_extras = [e for e in extras if e not in INCLUDABLE]
    if unknown_extras:
        raise ValidationFailed(
            f"include: unknown field(s) {', '.join(unknown_extras)}; choose from {', '.join(INCLUDABLE)}"
        )
    resources = get_resources(request)
    service: PricingService = request.app.state.pricing
    found = await service.read_prices(bases, currencies)
    found_bases = {b for b, _ in found}
    found_vs = {v for _, v in found}
    missing_bases = [b for b in bases if b not in found_bases]
    missing_vs = [v for v in currencies if v not in found_vs]
    if missing_bases or missing_vs:
        async with transaction(resources.sessions) as session:
            known = await repository.known_symbols(session, missing_bases) if missing_bases else set()
            known_vs = await repository.known_currencies(session) if missing_vs else set()
        unknown = [b for b in missing_bases if b not in known]
        if unknown:
            raise UnknownSymbol(f"unknown coin: {', '.join(unknown)}", details={"unknown": unknown})
        configured = set(resources.settings.vs_currencies)
        unknown_vs = [v for v in missing_vs if v not in known_vs and v not in configured]
        if unknown_vs:
            raise UnknownCurrency(f"unknown currency: {', '.join(unknown_vs)}", details={"unknown": unknown_vs})
    if not found:
        raise NoFreshData(
            "no price yet for the requested coins and currencies; sources may still be starting",
            retry_after=5,
        )
    market: dict[tuple[str, str], dict[str, Decimal | None]] = {}
    if "market_cap" in extras or "change_24h" in extras:
        current = {key: Decimal(entry["price"]) for key, entry in found.items()}
        coins = CoinsService(resources.settings, sessions=resources.sessions, publisher=resources.publisher)
        market = await coins.price_extras(current, extras)
    body: dict[str, dict[str, Any]] = {}
    for base in bases:
        for currency in currencies:
            entry = found.get((base, currency))
            if entry is None:
                continue
            out: dict[str, Any] = {
                "price": Decimal(entry["price"]),
                "last_updated": entry["last_updated"].replace("+00:00", "Z"),
                "status": entry["status"],
                "sources_used": entry["sources_used"],
            }
            for extra in extras:
                if extra in ("market_cap", "change_24h"):
                    out[extra] = market.get((base, currency), {}).get(extra)
                    continue
                value = entry.get(extra)
                out[extra] = Decimal(value) if value is not None else None
            body.setdefault(base, {})[currency] = out
    return DecimalJSONResponse(body)


@router.get(
    "/api/v1/prices/{symbol}/sources",
    response_model=SourcesOut,
    summary="Each source's latest quote beside the consolidated price",
    description="The cross-exchange comparison: every source's vote for `symbol` in `vs` with its status "
    "(`used`, `stale` or `outlier`). Example: `/api/v1/prices/BTC/sources?vs=USD`.",
    responses=error_responses(404, 422),
)
async def get_sources(
    request: Request,
    symbol: str = Path(description="coin symbol, case-insensitive", pattern=SYMBOL_PATTERN, examples=["BTC"]),
    vs: str = Query(default="USD", description="currency", pattern=SYMBOL_PATTERN, examples=["USD"]),
) -> DecimalJSONResponse:
    base = parse_symbols(symbol, "symbol", limit=1)[0]
    currency = parse_symbols(vs, "vs", limit=1)[0]
    resources = get_resources(request)
    async with transaction(resources.sessions) as session:
        known = await repository.known_symbols(session, [base])
        if base not in known:
            raise UnknownSymbol(f"unknown coin: {base}", details={"unknown": [base]})
        quotes = await repository.quotes_for(session, base)
        consolidated = await repository.get_price(session, base, currency)
        stable = await repository.stablecoin_usd_rates(session, USD_STABLECOINS)
    if consolidated is None and currency not in resources.settings.vs_currencies:
        raise UnknownCurrency(f"unknown currency: {currency}", details={"unknown": [currency]})
    # One vote per source, chosen as consolidation chooses (direct market first, else most liquid).
    groups, _ = source_votes(quotes, stable)
    chosen = {(v.source, v.quote) for v in groups.get((base, currency), [])}
    votes = [q for q in quotes if (q.source, q.quote) in chosen]
    body = {
        "symbol": base,
        "vs": currency,
        "consolidated": None
        if consolidated is None
        else {
            "price": consolidated.price,
            "status": consolidated.status,
            "sources_used": consolidated.sources_used,
            "sources_total": consolidated.sources_total,
            "method": consolidated.method,
            "last_updated": consolidated.last_updated,
        },
        "sources": [
            {
                "source": q.source,
                "pair": q.pair,
                "quote": q.quote,
                "price": q.price * stable.get(q.quote, Decimal(1)) if q.quote != currency else q.price,
                "quoted_price": q.price,
                "bid": q.bid,
                "ask": q.ask,
                "volume_24h": q.volume_24h,
                "timestamp": q.exchange_ts,
                "received_at": q.received_at,
                "transport": q.transport,
                "status": q.status,
            }
            for q in votes
        ],
    }
    return DecimalJSONResponse(body)

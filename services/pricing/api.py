"""Routes of the pricing service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from services.pricing.schemas import PricesOut, SourcesOut
from services.pricing.service import PricingService
from shared.errors import ValidationFailed, error_responses
from shared.responses import FastDecimalJSONResponse
from shared.service_app import lifespan_state
from shared.validation import SYMBOL_PATTERN, SYMBOL_RE, choice_list_pattern, symbol_list_pattern

router = APIRouter(tags=["market data"])

INCLUDABLE = ("market_cap", "volume_24h", "change_24h")
MAX_SYMBOLS = 100
MAX_CURRENCIES = 20

Pricing = Annotated[PricingService, Depends(lifespan_state("pricing", PricingService))]


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
    pricing: Pricing,
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
) -> FastDecimalJSONResponse:
    bases = parse_symbols(symbols, "symbols")
    currencies = parse_symbols(vs, "vs", limit=MAX_CURRENCIES)
    extras = [part.strip() for part in (include or "").split(",") if part.strip()]
    unknown_extras = [e for e in extras if e not in INCLUDABLE]
    if unknown_extras:
        raise ValidationFailed(
            f"include: unknown field(s) {', '.join(unknown_extras)}; choose from {', '.join(INCLUDABLE)}"
        )
    body, memo = await pricing.price_table(bases, currencies, extras)
    response = FastDecimalJSONResponse(body)
    if (header := memo.header()) is not None:
        response.headers[header[0]] = header[1]
    return response


@router.get(
    "/api/v1/prices/{symbol}/sources",
    response_model=SourcesOut,
    summary="Each source's latest quote beside the consolidated price",
    description="The cross-exchange comparison: every source's vote for `symbol` in `vs` with its status "
    "(`used`, `stale` or `outlier`). Example: `/api/v1/prices/BTC/sources?vs=USD`.",
    responses=error_responses(404, 422),
)
async def get_sources(
    pricing: Pricing,
    symbol: str = Path(description="coin symbol, case-insensitive", pattern=SYMBOL_PATTERN, examples=["BTC"]),
    vs: str = Query(default="USD", description="currency", pattern=SYMBOL_PATTERN, examples=["USD"]),
) -> FastDecimalJSONResponse:
    base = parse_symbols(symbol, "symbol", limit=1)[0]
    currency = parse_symbols(vs, "vs", limit=1)[0]
    return FastDecimalJSONResponse(await pricing.source_comparison(base, currency))

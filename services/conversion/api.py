"""Routes of the conversion service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from services.conversion.schemas import ConvertOut, RatesOut
from services.conversion.service import ConversionService, parse_amount, parse_currency
from shared.errors import error_responses
from shared.responses import FastDecimalJSONResponse, MemoHint
from shared.service_app import lifespan_state
from shared.timeparse import parse_time
from shared.validation import SYMBOL_PATTERN, TIME_DESCRIPTION, TIME_SCHEMA

router = APIRouter(tags=["conversion"])

# A live conversion may be reused by the gateway until the next price event of any pair (its route can change
# with any edge of the table) and for half a second at most: fiat rates change without a price event, and the
# service itself re-reads its table's version every VERSION_CHECK_SECONDS.
LIVE_MEMO = MemoHint(ttl=0.5, pairs={}, any_pair=True)

CONVERT_DESCRIPTION = """
Converts an amount between any two currencies: tracked coins, the stablecoins seen in quotes (at their
measured USD rate) and every ECB currency (about 30 fiat), in any direction.

**How the rate is made.** Currencies and rates form a graph: consolidated prices (BTC/USD, BTC/EUR from EUR
markets, ETH/BTC), ECB reference rates against EUR (so USD->JPY is a cross rate through EUR) and measured
stablecoin/USD rates. The path with the fewest hops among usable rates wins (a direct pair beats
triangulation); ties go to fresher prices and more liquid markets. `path` and `legs` show how the number was
made. A->B and B->A use the same path, so converting back returns the amount within the stated rounding.

**Precision.** Decimal arithmetic (34 significant digits) throughout; `result` is rounded half-even to the
target's ISO 4217 minor units for fiat (USD 2, JPY 0, KWD 3) or to 10 significant digits for crypto and
stablecoins. `precision=` replaces that: decimal places for fiat, significant digits for crypto. `rounding`
states what was applied; its `unit` bounds the error (half a unit). `rate` has 18 significant digits.

**Past moments.** With `at=` (ISO 8601 or Unix seconds) crypto rates come from stored candles (the finest
candle containing the moment, else the nearest earlier close; each leg says which) and fiat rates from the
last ECB day published on or before the moment (16:00 CET; weekends and holidays use the previous working
day and `notes` say so). When a stored rate snapshot was taken within 15 minutes before the moment, that
exact rate table is used (`basis: snapshot`), so past conversions are reproducible. Before the earliest
stored data: 404.

**Errors.** Unknown currency 404; amount not a positive finite number or above 1e15: 422; `from` equal to
`to` returns the amount; no fresh rate: 503 with Retry-After. Requests read the cached rate table and never
wait on an exchange.

Example: `GET /api/v1/convert?from=BTC&to=EUR&amount=1.5`, or
`GET /api/v1/convert?from=JPY&to=ETH&amount=10000&at=2026-03-01T12:00:00Z`.
"""


Conversion = Annotated[ConversionService, Depends(lifespan_state("conversion", ConversionService))]


@router.get(
    "/api/v1/convert",
    response_model=ConvertOut,
    summary="Convert an amount between two currencies, now or at a past moment",
    description=CONVERT_DESCRIPTION,
    responses=error_responses(404, 422, 503),
)
async def convert(
    service: Conversion,
    from_: str = Query(
        alias="from", description="currency or coin to convert from", pattern=SYMBOL_PATTERN, examples=["BTC"]
    ),
    to: str = Query(description="currency or coin to convert to", pattern=SYMBOL_PATTERN, examples=["EUR"]),
    amount: str = Query(default="1", description="a positive decimal number, at most 1e15", examples=["1.5"]),
    at: str | None = Query(
        default=None,
        description=f"a past moment: {TIME_DESCRIPTION}",
        json_schema_extra=TIME_SCHEMA,
        examples=["2026-03-01T12:00:00Z"],
    ),
    precision: int | None = Query(
        default=None, ge=0, le=30, description="decimal places (fiat) or significant digits (crypto)", examples=[8]
    ),
) -> FastDecimalJSONResponse:
    src = parse_currency(from_, "from")
    dst = parse_currency(to, "to")
    value = parse_amount(amount)
    moment = parse_time(at, "at") if at is not None else None
    body = await service.convert(src, dst, value, at=moment, precision=precision)
    response = FastDecimalJSONResponse(body)
    if body.get("basis") == "live" and (header := LIVE_MEMO.header()) is not None:
        response.headers[header[0]] = header[1]
    return response


@router.get(
    "/api/v1/rates",
    response_model=RatesOut,
    summary="Every known currency's rate against a base currency",
    description="Units of each currency per 1 `base`, by the same paths `/api/v1/convert` uses (18 significant "
    "digits), with the path and the oldest observation behind each rate. Currencies with no fresh rate are "
    "listed under `unavailable`. Example: `GET /api/v1/rates?base=USD` gives EUR, JPY, BTC, ETH, USDT...",
    responses=error_responses(404, 422, 503),
)
async def rates(
    service: Conversion,
    base: str = Query(
        default="USD", description="the currency rates are expressed against", pattern=SYMBOL_PATTERN, examples=["USD"]
    ),
) -> FastDecimalJSONResponse:
    body = await service.rates(parse_currency(base, "base"))
    return FastDecimalJSONResponse(body)

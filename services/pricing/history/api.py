"""Route of price history: GET /api/v1/prices/{symbol}/history."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query

from services.pricing.history.schemas import HistoryOut
from services.pricing.history.service import INTERVAL_CHOICES, MAX_POINTS, HistoryService, plan_query
from shared.errors import ValidationFailed, error_responses
from shared.responses import FastDecimalJSONResponse
from shared.service_app import lifespan_state
from shared.timeparse import parse_time
from shared.validation import SYMBOL_PATTERN, SYMBOL_RE, TIME_DESCRIPTION, TIME_SCHEMA

router = APIRouter(tags=["market data"])

INTERVAL_HEADER = "X-Interval"
# INTERVAL_CHOICES as a type, so the schema lists them (tests/test_history.py keeps the two equal).
Interval = Literal["1m", "5m", "15m", "1h", "4h", "1d", "auto"]
History = Annotated[HistoryService, Depends(lifespan_state("history", HistoryService))]

DESCRIPTION = f"""OHLCV candles of a coin in one currency, oldest first: every candle whose period overlaps
[`start`, `end`).

- `interval`: one of `{"`, `".join(INTERVAL_CHOICES)}`. `auto` picks like CoinGecko: `5m` for ranges up to
  1 day, `1h` up to 90 days, `1d` beyond. The interval used is returned in the `{INTERVAL_HEADER}` header.
- `start`, `end`: ISO 8601 or Unix seconds; `end` defaults to now, `start` to one day before `end`.
- At most {MAX_POINTS} candles per request (422 otherwise, naming a coarser interval that fits).
- Candles are built from the consolidated price (their `volume` is null) or loaded from an exchange by
  `coinlytics backfill` (volume on that exchange). 1-minute candles are kept for
  `COINLYTICS_RETENTION_CANDLES_1M_DAYS` days (default 90); hourly and daily candles are kept forever.
- A known coin with no candles in the range gives `[]`.

Example: `/api/v1/prices/BTC/history?vs=USD&start=2021-09-19&end=2021-09-22&interval=1d`
"""


def _symbol(raw: str, name: str) -> str:
    value = raw.strip().upper()
    if not SYMBOL_RE.match(value):
        raise ValidationFailed(f"{name}: not a symbol: {raw!r}")
    return value


@router.get(
    "/api/v1/prices/{symbol}/history",
    response_model=HistoryOut,
    summary="OHLCV price history of a coin",
    description=DESCRIPTION,
    responses={
        200: {
            "description": "Candles, oldest first",
            "headers": {INTERVAL_HEADER: {"description": "the interval used (what `auto` chose)",
                                          "schema": {"type": "string", "example": "5m"}}},
        },
        **error_responses(404, 422),
    },
)  # fmt: skip
async def get_history(
    service: History,
    symbol: str = Path(description="coin symbol, case-insensitive", pattern=SYMBOL_PATTERN, examples=["BTC"]),
    vs: str = Query(default="USD", description="currency", pattern=SYMBOL_PATTERN, examples=["USD"]),
    start: str | None = Query(
        default=None, description=TIME_DESCRIPTION, json_schema_extra=TIME_SCHEMA, examples=["2021-09-19T00:00:00Z"]
    ),
    end: str | None = Query(
        default=None,
        description=f"{TIME_DESCRIPTION}; default now",
        json_schema_extra=TIME_SCHEMA,
        examples=["1632268800"],
    ),
    interval: Interval = Query(default="auto", description="1m, 5m, 15m, 1h, 4h, 1d or auto", examples=["auto"]),
) -> FastDecimalJSONResponse:
    query = plan_query(
        _symbol(symbol, "symbol"),
        _symbol(vs, "vs"),
        parse_time(start, "start") if start is not None else None,
        parse_time(end, "end") if end is not None else None,
        interval,
        now=datetime.now(UTC),
    )
    rows = await service.candles(query)
    return FastDecimalJSONResponse(rows, headers={INTERVAL_HEADER: query.interval})

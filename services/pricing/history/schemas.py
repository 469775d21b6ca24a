"""Response models of the history endpoint (documentation of the shapes; values are exact decimals)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, Field, RootModel


class CandleOut(BaseModel):
    t: datetime = Field(description="start of the candle's period (UTC, periods aligned on the Unix epoch)")
    open: Decimal = Field(description="first price of the period", examples=[10134.23])
    high: Decimal = Field(description="highest price of the period")
    low: Decimal = Field(description="lowest price of the period")
    close: Decimal = Field(description="last price of the period")
    volume: Decimal | None = Field(
        default=None,
        description="base-asset volume traded in the period on the exchange a backfilled candle came from; "
        "null for candles built from consolidated prices (sources report only a rolling 24h volume)",
    )


class HistoryOut(RootModel[list[CandleOut]]):
    model_config = {
        "json_schema_extra": {
            "examples": [[
                {"t": "2021-09-19T00:00:00Z", "open": 48294, "high": 48366.5, "low": 46816.2, "close": 47242.5,
                 "volume": 3934.78015558},
                {"t": "2021-09-20T00:00:00Z", "open": 47242.4, "high": 47353.6, "low": 42470.5, "close": 43018.6,
                 "volume": 10832.50206904},
            ]]
        }
    }  # fmt: skip

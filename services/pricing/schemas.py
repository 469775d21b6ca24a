"""Response models of the pricing service (documentation of the shapes; values are exact decimals)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, Field, RootModel


class PriceEntry(BaseModel):
    price: Decimal = Field(examples=[10134.23], description="consolidated price, exact decimal")
    last_updated: datetime = Field(description="arrival time of the newest quote used")
    status: str = Field(examples=["fresh"], description="fresh, or stale when too few fresh sources agree")
    sources_used: int = Field(examples=[3])
    volume_24h: Decimal | None = Field(default=None, description="with include=volume_24h")
    market_cap: Decimal | None = Field(
        default=None,
        description="with include=market_cap: circulating supply x this price (else CoinGecko's USD market cap "
        "restated by price / USD price), as /api/v1/coins; null until CoinGecko data is known",
    )
    change_24h: Decimal | None = Field(
        default=None,
        description="with include=change_24h: percent change against our candle close nearest to 24 h ago "
        "(within 1 h), as change_24h_pct of /api/v1/coins; null without such a candle",
    )


class PricesOut(RootModel[dict[str, dict[str, PriceEntry]]]):
    model_config = {
        "json_schema_extra": {
            "examples": [
                {"BTC": {"USD": {"price": 10134.23, "last_updated": "2026-11-25T10:00:00Z",
                                 "status": "fresh", "sources_used": 3}}}
            ]
        }
    }  # fmt: skip


class SourceQuoteOut(BaseModel):
    source: str = Field(examples=["binance"])
    pair: str = Field(examples=["BTCUSDT"])
    quote: str = Field(examples=["USDT"], description="the currency the source quoted in")
    price: Decimal = Field(description="the source's price restated in `vs`")
    quoted_price: Decimal = Field(description="the price as the source quoted it, in `quote`")
    bid: Decimal | None = None
    ask: Decimal | None = None
    volume_24h: Decimal | None = None
    timestamp: datetime = Field(description="the exchange's time of the quote")
    received_at: datetime
    transport: str = Field(examples=["ws"], description="ws, rest or sim")
    status: str = Field(examples=["used"], description="used, stale or outlier")


class ConsolidatedOut(BaseModel):
    price: Decimal
    status: str
    sources_used: int
    sources_total: int
    method: str = Field(examples=["vwap-mad2.5"])
    last_updated: datetime


class SourcesOut(BaseModel):
    symbol: str
    vs: str
    consolidated: ConsolidatedOut | None
    sources: list[SourceQuoteOut]

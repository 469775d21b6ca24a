"""Shapes of the coins endpoints (documentation; values are written as exact decimals)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from shared.validation import SYMBOL_PATTERN


class CoinOut(BaseModel):
    symbol: str = Field(examples=["BTC"])
    name: str | None = Field(examples=["Bitcoin"])
    price: Decimal | None = Field(description="consolidated price in `vs` (null before the first quote)")
    market_cap: Decimal | None = Field(
        description="circulating supply (CoinGecko) x our consolidated price in `vs`; when the supply is "
        "unknown, CoinGecko's USD market cap x (our price in `vs` / our price in USD)"
    )
    volume_24h: Decimal | None = Field(description="24 h volume summed over the sources used")
    change_1h_pct: Decimal | None = Field(description="percent change against our own close nearest to 1 h ago")
    change_24h_pct: Decimal | None = Field(description="percent change against our own close nearest to 24 h ago")
    change_7d_pct: Decimal | None = Field(description="percent change against our own close nearest to 7 days ago")
    last_updated: datetime | None = Field(description="arrival time of the newest quote in the price")
    price_status: str | None = Field(default=None, examples=["fresh"], description="fresh or stale")


class SourceUsedOut(BaseModel):
    source: str = Field(examples=["binance"])
    pair: str = Field(examples=["BTCUSDT"])
    quote: str = Field(examples=["USDT"])
    price: Decimal = Field(description="the price as the source quoted it, in `quote`")
    volume_24h: Decimal | None = None
    timestamp: datetime = Field(description="the exchange's time of the quote")
    status: str = Field(examples=["used"], description="used, stale, outlier or unused")


class CoinDetailOut(CoinOut):
    vs: str = Field(examples=["USD"])
    coingecko_id: str | None = Field(examples=["bitcoin"])
    circulating_supply: Decimal | None = Field(description="from CoinGecko")
    total_supply: Decimal | None = Field(description="from CoinGecko")
    market_cap_method: str | None = Field(examples=["circulating_supply x price"])
    market_data_updated_at: datetime | None = Field(description="last CoinGecko refresh of supply and market cap")
    sources_used: list[str] = Field(examples=[["binance", "kraken"]], description="sources in the current price")
    sources: list[SourceUsedOut] = Field(description="every source's latest quote of this coin")


class CoinCreateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    symbol: str = Field(pattern=SYMBOL_PATTERN, examples=["MATIC"], description="ticker, case-insensitive")
    name: str | None = Field(default=None, min_length=1, max_length=100, examples=["Polygon"])


class AdminCoinOut(BaseModel):
    symbol: str = Field(examples=["MATIC"])
    name: str | None = Field(examples=["Polygon"])
    active: bool
    added_at: datetime | None
    coingecko_id: str | None = Field(default=None, examples=["matic-network"])
    change: str | None = Field(
        default=None, examples=["added"], description="on writes: added, reactivated, deactivated or unchanged"
    )


class AdminCoinsOut(BaseModel):
    coins: list[AdminCoinOut]

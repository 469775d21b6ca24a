"""CoinGecko's response shapes, with its field names and JSON types (documentation of /api/v3 in the merged
spec). A field we cannot know is null, so every such field is optional here; numbers are floats as
CoinGecko writes them, timestamps of series in milliseconds."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel


class Open(BaseModel):
    # Our answers may carry a field CoinGecko's clients ignore (e.g. a ticker's coinlytics_status).
    model_config = ConfigDict(extra="allow")


class CGErrorOut(BaseModel):
    error: str = Field(examples=["coin not found"])


class CGStatusError(BaseModel):
    error_code: int = Field(examples=[429])
    error_message: str


class CGStatusErrorOut(BaseModel):
    status: CGStatusError


class PingOut(BaseModel):
    gecko_says: str = Field(examples=["(V3) To the Moon!"])


class SimplePriceOut(RootModel[dict[str, dict[str, float | int | None]]]):
    model_config = {
        "json_schema_extra": {
            "examples": [{"bitcoin": {"usd": 67187.3358936566, "usd_market_cap": 1317802988326.25,
                                      "usd_24h_vol": 31260929299.5248, "usd_24h_change": 3.63727894677354,
                                      "last_updated_at": 1711356300}}]
        }
    }  # fmt: skip


class CoinListItem(Open):
    id: str = Field(examples=["bitcoin"])
    symbol: str = Field(examples=["btc"])
    name: str = Field(examples=["Bitcoin"])
    platforms: dict[str, str | None] | None = Field(default=None, description="with include_platform=true: {}")


class Roi(Open):
    times: float | None = None
    currency: str | None = None
    percentage: float | None = None


class Sparkline(Open):
    price: list[float] = Field(description="hourly closes of the last 7 days, oldest first")


class MarketOut(Open):
    id: str
    symbol: str
    name: str
    image: str | None = Field(description="null: we keep no coin images")
    current_price: float | None
    market_cap: float | None
    market_cap_rank: int | None = Field(description="rank by our market cap among the tracked coins")
    fully_diluted_valuation: float | None
    total_volume: float | None = Field(description="24 h volume of the sources used, in `vs_currency`")
    high_24h: float | None
    low_24h: float | None
    price_change_24h: float | None
    price_change_percentage_24h: float | None
    market_cap_change_24h: float | None
    market_cap_change_percentage_24h: float | None
    circulating_supply: float | None
    total_supply: float | None
    max_supply: float | None
    ath: float | None
    ath_change_percentage: float | None
    ath_date: str | None
    atl: float | None
    atl_change_percentage: float | None
    atl_date: str | None
    roi: Roi | None
    last_updated: str | None
    sparkline_in_7d: Sparkline | None = None
    price_change_percentage_1h_in_currency: float | None = None
    price_change_percentage_24h_in_currency: float | None = None
    price_change_percentage_7d_in_currency: float | None = None
    price_change_percentage_14d_in_currency: float | None = None
    price_change_percentage_30d_in_currency: float | None = None
    price_change_percentage_200d_in_currency: float | None = None
    price_change_percentage_1y_in_currency: float | None = None


class TickerMarket(Open):
    name: str | None
    identifier: str | None
    has_trading_incentive: bool | None


class Converted(Open):
    btc: float | None
    eth: float | None
    usd: float | None


class TickerOut(Open):
    base: str
    target: str
    market: TickerMarket
    last: float | None
    volume: float | None
    converted_last: Converted
    converted_volume: Converted
    trust_score: str | None
    bid_ask_spread_percentage: float | None
    timestamp: str | None
    last_traded_at: str | None
    last_fetch_at: str | None
    is_anomaly: bool = Field(description="true when our consolidation rejected this quote as an outlier")
    is_stale: bool = Field(description="true when the quote was too old to count")
    trade_url: str | None
    token_info_url: str | None
    coin_id: str
    target_coin_id: str | None = None
    coinlytics_status: str | None = Field(default=None, description="ours: used, stale or outlier")
    coinlytics_pair: str | None = Field(default=None, description="ours: the source's market symbol")


class TickersOut(Open):
    name: str
    tickers: list[TickerOut]


class CoinOut(Open):
    id: str
    symbol: str
    name: str
    web_slug: str | None
    asset_platform_id: str | None
    platforms: dict[str, Any]
    detail_platforms: dict[str, Any]
    block_time_in_minutes: float | None
    hashing_algorithm: str | None
    categories: list[str]
    preview_listing: bool
    public_notice: str | None
    additional_notices: list[str]
    localization: dict[str, str] | None = None
    description: dict[str, str]
    links: dict[str, Any] | None
    image: dict[str, str | None] | None
    country_origin: str | None
    genesis_date: str | None
    sentiment_votes_up_percentage: float | None
    sentiment_votes_down_percentage: float | None
    watchlist_portfolio_users: float | None
    market_cap_rank: int | None
    market_data: dict[str, Any] | None = Field(
        default=None, description="CoinGecko's market_data: per-currency objects keyed by lower-case code"
    )
    status_updates: list[Any]
    last_updated: str | None
    tickers: list[TickerOut] | None = None


class MarketChartOut(BaseModel):
    prices: list[list[float]] = Field(description="[ms, price]")
    market_caps: list[list[float]] = Field(description="[ms, market cap]")
    total_volumes: list[list[float]] = Field(description="[ms, 24 h volume]: only the newest point (see docs)")


class OhlcOut(RootModel[list[list[float]]]):
    model_config = {"json_schema_extra": {"examples": [[[1709395200000, 61942, 62211, 61721, 61845]]]}}


class Rate(BaseModel):
    name: str
    unit: str
    value: float | None
    type: str = Field(examples=["crypto"], description="crypto or fiat")


class ExchangeRatesOut(BaseModel):
    rates: dict[str, Rate]

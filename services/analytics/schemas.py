"""Request and response shapes of the analytics API. Responses are documented here and built by the
statistics and chart modules as JSON-ready dicts; a value that can't be computed is null, with the reason
under ``nulls``."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.timeparse import EARLIEST, LATEST
from shared.validation import SYMBOL_PATTERN, parse_symbols

Interval = Literal["1m", "5m", "15m", "1h", "4h", "1d", "auto"]
Period = Literal["1d", "7d", "30d", "90d", "1y", "3y"]
ChartKind = Literal["history", "candles", "compare", "correlation", "sources"]
ChartFormat = Literal["json", "html", "csv"]


class _Open(BaseModel):
    # The statistics grow fields over time; the schema names the ones clients rely on.
    model_config = ConfigDict(extra="allow")


class Drawdown(_Open):
    pct: float | None = Field(default=None, description="peak to trough, in percent (0 or negative)")
    peak_at: str | None = None
    trough_at: str | None = None
    recovered_at: str | None = Field(default=None, description="first time back at the peak; null if not yet")


class CoinStats(_Open):
    symbol: str = Field(examples=["BTC"])
    candles: int = Field(description="candles present in the range")
    expected: int = Field(description="candles the range and interval call for")
    coverage: float = Field(description="candles / expected, 0 to 1")
    first: float | None = None
    last: float | None = None
    total_return_pct: float | None = None
    periodic_returns: dict[str, float | None] | None = Field(
        default=None, description="mean, median, std, best and worst per-interval return (percent), positive share"
    )
    annualised_volatility_pct: float | None = None
    max_drawdown: Drawdown | None = None
    sharpe: float | None = Field(default=None, description="annualised, over the risk-free rate")
    beta: float | None = Field(default=None, description="against the benchmark")
    nulls: dict[str, str] = Field(default_factory=dict, description="why a value is null")


class Correlation(_Open):
    symbols: list[str]
    matrix: list[list[float | None]]


class CompareOut(_Open):
    vs: str
    start: str
    end: str
    interval: str
    benchmark: str | None = None
    risk_free_rate: float
    coins: list[CoinStats]
    correlation: Correlation
    series: dict[str, Any] = Field(description="t (times), normalised (start = 100) and returns_pct per coin")
    empty: bool = Field(description="true when no coin has a candle in the range")
    note: str | None = None


class AnalysisOut(_Open):
    symbol: str
    vs: str
    start: str
    end: str
    interval: str
    summary: dict[str, Any]
    indicators: dict[str, Any] = Field(description="t, close, SMAs, EMAs, RSI and Bollinger bands, aligned on t")
    anomalies: list[dict[str, Any]] = Field(description="each with t, kind (return or volume), value, baseline, score")
    anomaly_method: dict[str, Any]
    empty: bool
    note: str | None = None


class ComparisonIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, examples=["Large caps"])
    symbols: list[str] = Field(min_length=2, max_length=20, examples=[["BTC", "ETH", "SOL"]])
    vs: str = Field(default="USD", pattern=SYMBOL_PATTERN, examples=["USD"])
    period: Period | None = Field(
        default=None, description="a relative range (the last 30 days at each run); default 30d without start"
    )
    start: datetime | None = Field(default=None, description="a fixed range's start (instead of period)")
    end: datetime | None = Field(default=None, description="a fixed range's end; omitted: each run's now")
    interval: Interval = "auto"
    benchmark: str | None = Field(default=None, pattern=SYMBOL_PATTERN, examples=["BTC"])
    risk_free_rate: float = Field(default=0.0, gt=-1, lt=1, description="annual, as a fraction (0.04 is 4%)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        stripped = value.strip()
        if not stripped or any(ord(c) < 32 for c in stripped):
            raise ValueError("a name of printable characters")
        return stripped

    @field_validator("symbols")
    @classmethod
    def _symbols(cls, value: list[str]) -> list[str]:
        return parse_symbols(value)

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("give a time zone (Z for UTC)")
        if not EARLIEST <= value <= LATEST:
            raise ValueError(f"between {EARLIEST.date()} and {LATEST.date()}")
        return value


class ComparisonOut(BaseModel):
    id: uuid.UUID
    name: str
    symbols: list[str]
    vs: str
    period: str | None
    start: str | None
    end: str | None
    interval: str
    benchmark: str | None
    risk_free_rate: str
    created_at: str


class ComparisonsOut(BaseModel):
    items: list[ComparisonOut]

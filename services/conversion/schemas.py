"""Response models of the conversion service (documentation of the shapes; values are exact decimals)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field

CONVERT_EXAMPLE: dict[str, Any] = {
    "from": "BTC",
    "to": "JPY",
    "amount": 1.5,
    "result": 2206978,
    "rate": 1471318.71027372911,
    "path": ["BTC", "USD", "EUR", "JPY"],
    "legs": [
        {"from": "BTC", "to": "USD", "rate": 10134.23, "source": "consolidated", "as_of": "2026-11-25T10:00:00Z",
         "status": "fresh", "sources_used": 3},
        {"from": "USD", "to": "EUR", "rate": 0.888730892285815855, "source": "ecb",
         "as_of": "2026-11-24T15:00:00Z", "ecb_day": "2026-11-24"},
        {"from": "EUR", "to": "JPY", "rate": 163.36, "source": "ecb", "as_of": "2026-11-24T15:00:00Z",
         "ecb_day": "2026-11-24"},
    ],
    "as_of": "2026-11-24T15:00:00Z",
    "at": None,
    "basis": "live",
    "rounding": {"mode": "ROUND_HALF_EVEN", "kind": "decimal_places", "digits": 0, "unit": 1},
    "notes": [],
}  # fmt: skip


class Leg(BaseModel):
    from_: str = Field(alias="from", examples=["BTC"])
    to: str = Field(examples=["USD"])
    rate: Decimal = Field(description="units of `to` per 1 `from` (18 significant digits)")
    source: str = Field(
        examples=["consolidated"],
        description="consolidated (pricing's price), ecb (reference rate), sim-ecb (simulated reference rate "
        "of the offline demo, never a real one), measured (stablecoin/USD implied by markets), candle (stored "
        "OHLCV, with at=)",
    )
    as_of: str = Field(description="when this rate was observed or published")


class Rounding(BaseModel):
    mode: str = Field(examples=["ROUND_HALF_EVEN"])
    kind: str = Field(examples=["decimal_places"], description="decimal_places (fiat) or significant_digits")
    digits: int = Field(examples=[2])
    unit: Decimal = Field(
        examples=[0.01], description="the result is a multiple of this; the rounding error is at most half of it"
    )


class ConvertOut(BaseModel):
    model_config = {"json_schema_extra": {"examples": [CONVERT_EXAMPLE]}, "populate_by_name": True}

    from_: str = Field(alias="from")
    to: str
    amount: Decimal
    result: Decimal = Field(description="amount x rate, rounded as `rounding` says")
    rate: Decimal = Field(description="units of `to` per 1 `from` along `path` (18 significant digits)")
    path: list[str] = Field(description="the currencies the conversion went through")
    legs: list[Leg]
    as_of: str = Field(description="the oldest observation the result depends on")
    at: str | None = Field(description="the requested past moment, or null for a live conversion")
    basis: str = Field(description="live, snapshot (stored rate table), history (candles and ECB days), identity")
    rounding: Rounding | None
    notes: list[str] = Field(description="e.g. which ECB day was used on a weekend")
    snapshot_id: int | None = Field(default=None, description="with basis=snapshot")


class RateEntry(BaseModel):
    rate: Decimal = Field(description="units of this currency per 1 `base`")
    kind: str = Field(examples=["fiat"], description="crypto, fiat or stablecoin")
    path: list[str]
    as_of: str


class RatesOut(BaseModel):
    model_config = {
        "json_schema_extra": {
            "examples": [
                {"base": "USD", "as_of": "2026-11-25T10:00:00Z", "fiat_day": "2026-11-24",
                 "rates": {"BTC": {"rate": 0.0000986754790447818927, "kind": "crypto", "path": ["USD", "BTC"],
                                   "as_of": "2026-11-25T10:00:00Z"},
                           "EUR": {"rate": 0.888730892285815855, "kind": "fiat", "path": ["USD", "EUR"],
                                   "as_of": "2026-11-24T15:00:00Z"}},
                 "unavailable": []}
            ]
        }
    }  # fmt: skip

    base: str
    as_of: str = Field(description="the newest observation in the rate table")
    fiat_day: str | None = Field(description="the ECB publication day the fiat rates come from")
    fiat_source: str | None = Field(
        default=None, description="who published the fiat rates: ecb, or sim-ecb (simulated, offline demo)"
    )
    rates: dict[str, RateEntry]
    unavailable: list[str] = Field(description="known currencies with no fresh rate right now")

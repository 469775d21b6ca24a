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
    market_cap: Decimal | None = Field(default=None, description="with include=market_cap (null until known)")
    change_24h: Decimal | None = Field(default=None, description="with include=change_24h (null until known)")


class PricesOut(RootModel[dict[str, dict[str, PriceEntry]]]):
    model_config = {
        "json_schema_extra": {
            "examples": [
                {"BTC": {"USD": {"price": 10134.23, "last_updated": "2026-11-25T10:00:00Z",
                                 "status": "fresh", "sources_used": 3}}}
            ]
        }
    }  # fmt: skip

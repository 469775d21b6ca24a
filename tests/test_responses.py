"""The hot read routes' orjson encoder writes the same bytes as the simplejson one for the bodies they return."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from shared.responses import dumps, fast_dumps

NOW = datetime(2026, 12, 1, 13, 55, 0, 123456, tzinfo=UTC)

BODIES = [
    # /api/v1/prices
    {"BTC": {"USD": {"price": Decimal("10134.23"), "last_updated": "2026-11-25T10:00:00Z", "status": "fresh",
                     "sources_used": 3, "volume_24h": None, "market_cap": Decimal("1.9E+11")}},
     "ÉTH": {"EUR": {"price": Decimal("0.000000012300"), "change_24h": Decimal("-1.5")}}},
    # /api/v1/convert
    {"from": "BTC", "to": "JPY", "amount": Decimal("1.5"), "result": Decimal("2345678"), "rate": Decimal("1563785.3"),
     "path": ["BTC", "USD", "EUR", "JPY"], "legs": [{"from": "BTC", "to": "USD", "rate": Decimal("9912.33"),
     "as_of": "2026-12-01T13:55:00Z", "status": "fresh", "sources_used": 2}], "at": None, "notes": [],
     "rounding": {"mode": "ROUND_HALF_EVEN", "kind": "decimal_places", "digits": 0, "unit": Decimal("1")}},
    # /api/v1/prices/{symbol}/history (datetimes from the database)
    [{"t": NOW + timedelta(hours=i), "open": Decimal("10134.2312"), "high": Decimal("10200.50"),
      "low": Decimal("1E-8"), "close": Decimal("0"), "volume": None} for i in range(3)],
    [],
    {"nested": [[True, False, None, 0, -7, "a\"b\\c\n\u2603"]]},
]  # fmt: skip


@pytest.mark.parametrize("body", BODIES)
def test_fast_dumps_writes_the_same_bytes(body: object) -> None:
    assert fast_dumps(body) == dumps(body)
    # And exact decimals stay exact numbers for a client that parses them as decimals.
    assert json.loads(fast_dumps(body), parse_float=Decimal) == json.loads(dumps(body), parse_float=Decimal)


def test_an_unsupported_value_is_refused_as_dumps_refuses_it() -> None:
    with pytest.raises(TypeError):
        dumps({"x": object()})
    with pytest.raises(TypeError):
        fast_dumps({"x": object()})

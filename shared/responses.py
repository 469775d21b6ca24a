"""JSON responses that write Decimal values as exact JSON numbers (never through a binary float)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import simplejson
from fastapi.responses import JSONResponse

from shared.timeparse import iso_z


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return iso_z(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(content: Any) -> bytes:
    text: str = simplejson.dumps(content, use_decimal=True, default=_default, separators=(",", ":"), ensure_ascii=False)
    return text.encode()


class DecimalJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)

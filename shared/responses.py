"""JSON responses that write Decimal values as exact JSON numbers (never through a binary float)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
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


def _orjson_default(value: object) -> object:
    if isinstance(value, Decimal):
        # The number as str() writes it, verbatim: exact, as simplejson's use_decimal writes it.
        return orjson.Fragment(str(value))
    return _default(value)


def fast_dumps(content: Any) -> bytes:
    """``dumps`` through orjson, several times faster on bodies with many Decimals and datetimes. The bytes are
    the same as ``dumps`` gives for bodies of strings, ints, Decimals, datetimes, None, lists and string-keyed
    dicts; floats would differ in notation (orjson writes 1e-5 where simplejson writes 1e-05), so bodies that
    carry floats stay on ``DecimalJSONResponse``."""
    return orjson.dumps(content, default=_orjson_default, option=orjson.OPT_PASSTHROUGH_DATETIME)


class FastDecimalJSONResponse(JSONResponse):
    """``DecimalJSONResponse`` for the hot read routes (prices, conversions, history), whose bodies hold no
    floats. Returned by the route itself, so FastAPI neither validates nor re-encodes it: ``response_model``
    stays on the route for the OpenAPI schema only."""

    def render(self, content: Any) -> bytes:
        return fast_dumps(content)


# --- the gateway's read memo (services/gateway/memo.py) ------------------------------------------------------
# A service marks an answer that is the same for every caller and that only a price event (or the clock) can
# change with this response header; the gateway then answers the same request from its copy, until a price
# event for one of the named pairs arrives on the prices stream or ``ttl`` seconds pass. The gateway strips it.
MEMO_HEADER = "x-coinlytics-memo"
# Any price event drops the answer (a conversion: its route may change with any edge of the rate table).
MEMO_ANY_PAIR = "*"
# More pairs than this and the answer is not worth a header that long: it is not marked.
MEMO_MAX_PAIRS = 50
_NO_EVENT = "-"


@dataclass(frozen=True, slots=True)
class MemoHint:
    """``pairs`` maps each (base, vs) the answer shows (or would show: a gap) to the id of the price event it
    reflects (None: none known); ``any_pair`` instead ties it to every pair."""

    ttl: float
    pairs: dict[tuple[str, str], str | None]
    any_pair: bool = False

    def header(self) -> tuple[str, str] | None:
        if self.ttl <= 0 or (not self.any_pair and not self.pairs) or len(self.pairs) > MEMO_MAX_PAIRS:
            return None
        if self.any_pair:
            return MEMO_HEADER, f"{self.ttl:.3f} {MEMO_ANY_PAIR}"
        items = " ".join(f"{b}/{v}={event or _NO_EVENT}" for (b, v), event in self.pairs.items())
        return MEMO_HEADER, f"{self.ttl:.3f} {items}"

    @classmethod
    def parse(cls, value: str) -> MemoHint | None:
        """The header's value, or None when it is not one this module wrote."""
        parts = value.split()
        if len(parts) < 2 or len(parts) > MEMO_MAX_PAIRS + 1:
            return None
        try:
            ttl = float(parts[0])
        except ValueError:
            return None
        if not 0 < ttl <= 60:
            return None
        if parts[1:] == [MEMO_ANY_PAIR]:
            return cls(ttl=ttl, pairs={}, any_pair=True)
        pairs: dict[tuple[str, str], str | None] = {}
        for item in parts[1:]:
            pair, sep, event = item.partition("=")
            base, slash, vs = pair.partition("/")
            if not (sep and slash and base and vs and event):
                return None
            pairs[(base, vs)] = None if event == _NO_EVENT else event
        return cls(ttl=ttl, pairs=pairs)

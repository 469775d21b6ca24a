"""What the API accepts for symbols, currencies and moments: one copy of each rule, used both to check
input and to state it in the OpenAPI schema (``Query(pattern=...)``), so generated clients, the fuzzer and
the server agree on what is valid."""

from __future__ import annotations

import re
from collections.abc import Sequence

# A coin or currency symbol as stored: upper-case letters and digits.
STORED_SYMBOL_PATTERN = r"^[A-Z0-9]{1,15}$"
SYMBOL_RE = re.compile(STORED_SYMBOL_PATTERN)
# As accepted in a request: either case (symbols are case-insensitive).
_SYMBOL = r"[A-Za-z0-9]{1,15}"
SYMBOL_PATTERN = f"^{_SYMBOL}$"


def symbol_list_pattern(limit: int) -> str:
    """A comma-separated list of at most ``limit`` symbols; spaces may follow a comma."""
    return f"^{_SYMBOL}(, *{_SYMBOL}){{0,{limit - 1}}}$"


def parse_symbols(raw: str | Sequence[str]) -> list[str]:
    """Symbols from a comma-separated string or a list: upper-cased, duplicates dropped, order kept; raises
    ValueError naming the entries that are not symbols."""
    items = raw.split(",") if isinstance(raw, str) else [str(item) for item in raw]
    symbols = [item.strip().upper() for item in items if item.strip()]
    bad = [s for s in symbols if not SYMBOL_RE.match(s)]
    if bad:
        raise ValueError(f"not symbols: {', '.join(bad)}")
    return list(dict.fromkeys(symbols))


def choice_list_pattern(choices: tuple[str, ...]) -> str:
    one = "(" + "|".join(re.escape(c) for c in choices) + ")"
    return f"^{one}(, *{one})*$"


# A moment (shared/timeparse.py): Unix seconds, or an ISO 8601 date or date-time with an optional UTC offset
# (none means UTC). Stated in the schema only (not checked by FastAPI): parse_time checks it, and its own
# messages name the accepted range (1970-01-01 to 9999-12-30 UTC).
_YEAR = r"(19[7-9][0-9]|[2-9][0-9]{3})"
_DATE = _YEAR + r"-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_CLOCK = r"([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
_OFFSET = r"(Z|[+-]([01][0-9]|2[0-3]):?[0-5][0-9])"
TIME_PATTERN = rf"^([0-9]{{1,11}}(\.[0-9]{{1,6}})?|{_DATE}(T{_CLOCK}{_OFFSET}?)?)$"
TIME_SCHEMA = {"pattern": TIME_PATTERN}
TIME_DESCRIPTION = (
    "Unix seconds (e.g. `1632268800`) or ISO 8601: a date (`2021-09-19`, midnight UTC) or a date-time "
    "(`2021-09-19T12:00:00Z`, `2021-09-19T14:00:00+02:00`; no offset means UTC)"
)

# Deliberately plain ASCII (no internationalised addresses): the same pattern is in the spec, so what the
# spec allows, the API accepts, and nothing PostgreSQL or SMTP can't carry gets through.
EMAIL_PATTERN = r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+$"
EMAIL_RE = re.compile(EMAIL_PATTERN)


def normalise_email(value: str) -> str:
    if len(value) > 254 or not EMAIL_RE.match(value):
        raise ValueError("not an email address")
    # Addresses are compared case-insensitively, which is what users expect of sign-in.
    return value.lower()

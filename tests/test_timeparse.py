"""Windows typed by operators (`--since 24h`, `?since=7d`): spans, moments, and what is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.errors import ValidationFailed
from shared.timeparse import parse_since

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "back"),
    [("15m", timedelta(minutes=15)), ("24h", timedelta(hours=24)), ("7d", timedelta(days=7)),
     (" 2W ", timedelta(weeks=2)), ("90s", timedelta(seconds=90))],
)  # fmt: skip
def test_a_span_counts_back_from_now(value: str, back: timedelta) -> None:
    assert parse_since(value, "since", NOW) == NOW - back


def test_a_moment_is_taken_as_it_is() -> None:
    assert parse_since("2026-11-30T08:00:00Z", "since", NOW) == datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


# "²h" and "٣d" pass str.isdigit() but not int(): they must be a clear refusal, not an exception.
@pytest.mark.parametrize("value", ["²h", "٣d", "0h", "-5m", "h", "", "99999999999d", "yesterday", "1.5h"])
def test_anything_else_is_a_validation_error_naming_the_parameter(value: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        parse_since(value, "since", NOW)
    assert "since" in refused.value.message

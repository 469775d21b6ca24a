"""CSV exports of history and comparisons, and the frame clean-up the charts share with them.

Pure functions: the service hands in what it already read; nothing here touches I/O or settings. Cells are
written as plain decimals (never scientific notation: a spreadsheet would read ``1.23e-06`` as text or
round it), times as ISO 8601 UTC with a "Z", and a value that is missing or not finite as an empty cell.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd

from shared.timeparse import iso_z

CANDLE_COLUMNS = ("open", "high", "low", "close", "volume")


def utc_index(index: pd.Index) -> pd.DatetimeIndex:
    """``index`` as a UTC DatetimeIndex: naive times are taken as UTC, other zones converted, and what is
    not a time becomes NaT (callers drop those rows)."""
    if isinstance(index, pd.DatetimeIndex):
        times = index
    else:
        times = pd.DatetimeIndex(pd.to_datetime(index, errors="coerce", utc=True, format="ISO8601"))
    return times.tz_localize("UTC") if times.tz is None else times.tz_convert("UTC")


def iso_time_array(index: pd.DatetimeIndex) -> np.ndarray:
    """ISO 8601 "Z" strings for a UTC index, as a numpy string array; fractions of a second appear only
    when some time has them."""
    if len(index) == 0:
        return np.array([], dtype=str)
    whole = bool(((index.microsecond == 0) & (index.nanosecond == 0)).all())
    return np.asarray(index.strftime("%Y-%m-%dT%H:%M:%SZ" if whole else "%Y-%m-%dT%H:%M:%S.%fZ"), dtype=str)


def iso_times(index: pd.DatetimeIndex) -> list[str]:
    return [str(t) for t in iso_time_array(index)]


def parse_moment(value: object) -> pd.Timestamp | None:
    """One moment (ISO string, datetime or Timestamp) in UTC, or None when it is not one."""
    if not isinstance(value, str | datetime):
        return None
    try:
        moment = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError):
        return None
    if moment is pd.NaT:
        return None
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


def numeric(values: object) -> pd.Series:
    """A float64 series with anything that is not a finite number turned into NaN."""
    series = pd.to_numeric(pd.Series(values), errors="coerce").astype("float64")
    return series.where(np.isfinite(series))


def candle_frame(candles: pd.DataFrame | None) -> pd.DataFrame:
    """Candles as the builders expect them: UTC times in order, one row per time, float64 OHLCV columns
    (a missing column is all NaN), non-finite values as NaN."""
    if candles is None or not isinstance(candles, pd.DataFrame) or candles.empty:
        return pd.DataFrame(
            {c: pd.Series(dtype="float64") for c in CANDLE_COLUMNS}, index=pd.DatetimeIndex([], tz="UTC")
        )
    frame = pd.DataFrame(index=utc_index(candles.index))
    for column in CANDLE_COLUMNS:
        frame[column] = numeric(candles[column].to_numpy()).to_numpy() if column in candles.columns else np.nan
    frame = frame[frame.index.notna()]
    # A repeated bucket (a late write racing a roll-up) keeps its last row, as the store would.
    frame = frame[~frame.index.duplicated(keep="last")]
    return frame.sort_index()


def decimal_text(value: object) -> str:
    """A number as a plain decimal string: the shortest form that reads back as the same float (so it is
    exact for what was stored), without an exponent, whole numbers without ".0"; "" for None, NaN,
    infinities and non-numbers."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, Decimal):
        text = format(value, "f") if value.is_finite() else ""
    elif isinstance(value, int | float | np.integer | np.floating):
        as_float = float(value)
        if not math.isfinite(as_float):
            return ""
        text = repr(as_float)
        if "e" in text:
            text = format(Decimal(text), "f")
    else:
        return ""
    text = text.removesuffix(".0")
    return "0" if text == "-0" else text


def _write(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def history_csv(symbol: str, vs: str, candles: pd.DataFrame) -> str:
    """``t,open,high,low,close,volume`` per candle, oldest first. ``symbol`` and ``vs`` are part of the
    signature so every export takes what names it; the file itself stays plain CSV with no preamble."""
    frame = candle_frame(candles)
    times = iso_times(pd.DatetimeIndex(frame.index))
    values = zip(*(frame[c].tolist() for c in CANDLE_COLUMNS), strict=True)
    return _write(
        ["t", *CANDLE_COLUMNS], ([t, *(decimal_text(v) for v in row)] for t, row in zip(times, values, strict=True))
    )


def compare_symbols(result: Mapping[str, Any]) -> list[str]:
    """The compared coins in the result's order (its ``coins`` list), then any other normalised series."""
    series = result.get("series")
    normalised = series.get("normalised") if isinstance(series, Mapping) else None
    if not isinstance(normalised, Mapping):
        return []
    ordered: list[str] = []
    coins = result.get("coins")
    for coin in coins if isinstance(coins, list) else []:
        symbol = coin.get("symbol") if isinstance(coin, Mapping) else None
        if isinstance(symbol, str) and symbol in normalised and symbol not in ordered:
            ordered.append(symbol)
    ordered.extend(s for s in normalised if isinstance(s, str) and s not in ordered)
    return ordered


def compare_times(result: Mapping[str, Any]) -> list[str]:
    """The comparison's time axis as ISO "Z" strings; a time that does not parse is kept as written."""
    series = result.get("series")
    raw = series.get("t") if isinstance(series, Mapping) else None
    if not isinstance(raw, list):
        return []
    out: list[str] = []
    for value in raw:
        moment = parse_moment(value)
        out.append(iso_z(moment.to_pydatetime()) if moment is not None else str(value))
    return out


def compare_values(result: Mapping[str, Any], symbol: str, length: int) -> list[Any]:
    """One coin's normalised values padded or cut to ``length`` (the time axis), so rows always line up."""
    series = result.get("series")
    normalised = series.get("normalised") if isinstance(series, Mapping) else None
    values = normalised.get(symbol) if isinstance(normalised, Mapping) else None
    values = list(values) if isinstance(values, list | tuple) else []
    return (values + [None] * length)[:length]


def compare_csv(result: dict[str, Any]) -> str:
    """``t`` then one column of normalised values (start = 100) per coin, headed by its symbol."""
    symbols = compare_symbols(result)
    times = compare_times(result)
    columns = [compare_values(result, s, len(times)) for s in symbols]
    rows = ([t, *(decimal_text(col[i]) for col in columns)] for i, t in enumerate(times))
    return _write(["t", *symbols], rows)

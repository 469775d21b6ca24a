"""The statistics behind the analytics endpoints: pure functions of candles already read from PostgreSQL.

Input is one coin's candles at one interval: a DataFrame indexed by tz-aware UTC bucket starts with float64
``open, high, low, close, volume`` columns. Every function here is free of I/O; results are JSON-ready
(python numbers, ISO 8601 "Z" strings, ``None`` where a value cannot be computed, never NaN or Infinity),
computed in float64 and rounded only on output: percentages and ratios to 6 decimals, prices to 8
significant digits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SECONDS_PER_YEAR = 365 * 86400  # crypto trades every day of the year
PCT_DECIMALS = 6
PRICE_DIGITS = 8
# Pearson's r over two points is always +-1 whatever the data, so a pair needs three common returns.
MIN_CORRELATION_RETURNS = 3
# A standard deviation this small is rounding noise of a constant series (e.g. a steady 1% per interval),
# not volatility: ratios divided by it would be meaningless.
ZERO_STD = 1e-12

NO_CANDLES = "no candles in the range"
ONE_CANDLE = "fewer than 2 candles"
NO_RETURNS = "no returns: no two consecutive candles"
ONE_RETURN = "fewer than 2 returns"
ZERO_VOLATILITY = "zero volatility"
NO_DRAWDOWN = "no drawdown: the close never fell below an earlier high"
NOT_RECOVERED = "not recovered by the end of the range"


# ---------------------------------------------------------------- output helpers


@contextmanager
def _quiet() -> Iterator[None]:
    """All-NaN columns are expected (a coin without data); their NaN results are masked out afterwards."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def pct_value(value: float | None) -> float | None:
    """A percentage or ratio as JSON: rounded, None for NaN/Infinity."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), PCT_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0


def _significant(values: FloatArray, digits: int = PRICE_DIGITS) -> FloatArray:
    """Rounds to ``digits`` significant digits, vectorised; NaN and Infinity pass through."""
    out = np.array(values, dtype=np.float64, copy=True)
    mask = np.isfinite(out) & (out != 0)
    if not mask.any():
        return out
    v = out[mask]
    # Decimals to keep; clipped so 10**k stays an exact float (k <= 22) or at least finite for tiny values.
    keep = np.clip(digits - 1 - np.floor(np.log10(np.abs(v))).astype(np.int64), -22, 300)
    scale = 10.0 ** np.abs(keep)
    # Dividing an integer-valued float by an exact power of ten gives the double nearest the decimal,
    # so the short repr is the rounded number (no 0.35280000000000006).
    out[mask] = np.where(keep >= 0, np.round(v * scale) / scale, np.round(v / scale) * scale)
    return out


def price_value(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(_significant(np.array([value], dtype=np.float64))[0])


def _json_list(values: FloatArray) -> list[float | None]:
    """NaN and +-Infinity become None (object arrays keep it vectorised for long series)."""
    out = values.astype(object)
    out[~np.isfinite(values)] = None
    result: list[float | None] = out.tolist()
    return result


def pct_list(values: FloatArray) -> list[float | None]:
    return _json_list(np.round(values, PCT_DECIMALS) + 0.0)


def price_list(values: FloatArray) -> list[float | None]:
    return _json_list(_significant(values))


def iso_times(index: pd.DatetimeIndex) -> list[str]:
    """Bucket starts as the contract writes moments: ISO 8601 in UTC with a "Z" (whole seconds)."""
    naive = index.tz_convert(UTC).tz_localize(None) if index.tz is not None else index
    stamps = np.datetime_as_string(naive.to_numpy().astype("datetime64[s]"), unit="s", timezone="UTC")
    result: list[str] = stamps.tolist()
    return result


# ---------------------------------------------------------------- time grid and alignment


def _epoch_seconds(moment: datetime) -> int:
    """Whole seconds since the epoch, flooring sub-second parts; naive moments are taken as UTC."""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return (aware - EPOCH) // timedelta(seconds=1)


def expected_index(start: datetime, end: datetime, step_seconds: int) -> pd.DatetimeIndex:
    """Bucket starts aligned to the epoch (as PostgreSQL's ``date_bin`` with origin 1970-01-01), from the
    bucket holding ``start`` up to, excluding, ``end``: every candle whose period overlaps [start, end)."""
    if step_seconds <= 0:
        raise ValueError(f"step_seconds must be positive, got {step_seconds}")
    first = (_epoch_seconds(start) // step_seconds) * step_seconds
    end_s = _epoch_seconds(end)
    # A sub-second tail of ``end`` still overlaps the bucket starting at its whole second.
    aware_end = end if end.tzinfo is not None else end.replace(tzinfo=UTC)
    if aware_end > EPOCH + timedelta(seconds=end_s):
        end_s += 1
    # Seconds resolution: datetime64[ns] stops in 2262, the API accepts moments up to 9999.
    seconds = np.arange(first, max(end_s, first), step_seconds, dtype=np.int64)
    return pd.DatetimeIndex(seconds.astype("datetime64[s]"), name="t").tz_localize(UTC)


def present_values(
    candles: pd.DataFrame, index: pd.DatetimeIndex, column: str, *, positive: bool = False
) -> FloatArray:
    """One column of the candles on ``index`` as float64, NaN where no candle (or no usable value) is there.

    Candles off the grid are dropped; a duplicated bucket keeps its last row. Non-finite values and, with
    ``positive``, values <= 0 count as missing: a price of 0 would turn every return into Infinity."""
    out = np.full(len(index), np.nan)
    if len(index) == 0 or candles is None or column not in candles.columns or candles.empty:
        return out
    stamps = _micros(pd.DatetimeIndex(candles.index))
    grid = _micros(index)
    values = pd.to_numeric(candles[column], errors="coerce").to_numpy(dtype=np.float64)
    # Matching on integer microseconds instead of reindexing: unit-agnostic (PostgreSQL gives us, the grid
    # is in s) and several times faster; the grid is sorted, the candles need not be.
    slots = np.clip(np.searchsorted(grid, stamps), 0, grid.size - 1)
    on_grid = grid[slots] == stamps
    # Fancy assignment keeps the last of duplicated slots, as a re-read bucket would.
    out[slots[on_grid]] = values[on_grid]
    bad = ~np.isfinite(out)
    if positive:
        bad |= out <= 0
    out[bad] = np.nan
    return out


def _micros(index: pd.DatetimeIndex) -> NDArray[np.int64]:
    aware = index.tz_localize(UTC) if index.tz is None else index.tz_convert(UTC)
    return np.asarray(aware.as_unit("us").asi8, dtype=np.int64)


def _fill_short_gaps(values: FloatArray, max_gap: int) -> FloatArray:
    """Forward-fills runs of at most ``max_gap`` NaNs that lie between two values; longer runs, and the
    runs before the first and after the last value, stay NaN (a guess across a long outage is not data)."""
    n = values.size
    valid = ~np.isnan(values)
    if n == 0 or valid.all() or not valid.any() or max_gap <= 0:
        return values.copy()
    positions = np.arange(n)
    previous = np.maximum.accumulate(np.where(valid, positions, -1))
    following = np.minimum.accumulate(np.where(valid, positions, n)[::-1])[::-1]
    gap = following - previous - 1
    fill = ~valid & (previous >= 0) & (following < n) & (gap <= max_gap)
    out = values.copy()
    out[fill] = values[previous[fill]]
    return out


def _present_and_filled(candles: pd.DataFrame, index: pd.DatetimeIndex, max_gap: int) -> tuple[FloatArray, FloatArray]:
    present = present_values(candles, index, "close", positive=True)
    return present, _fill_short_gaps(present, max_gap)


def _coverage(present: FloatArray) -> float:
    # An empty grid expects nothing and has nothing: reported as 0 so "no data" never reads as complete.
    return float(np.count_nonzero(~np.isnan(present)) / present.size) if present.size else 0.0


def align(candles: pd.DataFrame, index: pd.DatetimeIndex, *, max_gap: int = 3) -> tuple[pd.Series, float]:
    """Close prices on ``index``, forward-filled across gaps of at most ``max_gap`` missing intervals only,
    and the coverage: the share of expected candles present (0..1). Candles off the grid are ignored;
    non-positive or non-finite closes count as missing."""
    present, filled = _present_and_filled(candles, index, max_gap)
    return pd.Series(filled, index=index, name="close"), _coverage(present)


# ---------------------------------------------------------------- per-coin statistics (columns = coins)


def _simple_returns(closes: FloatArray) -> FloatArray:
    """Returns on the same grid as ``closes`` (row 0 NaN); NaN wherever either neighbour is missing, so no
    return spans an unfilled gap."""
    out = np.full(closes.shape, np.nan)
    if closes.shape[0] > 1:
        with _quiet():
            out[1:] = closes[1:] / closes[:-1] - 1.0
    return out


def _first_last(closes: FloatArray) -> tuple[FloatArray, FloatArray, NDArray[np.bool_]]:
    valid = ~np.isnan(closes)
    has: NDArray[np.bool_] = np.asarray(valid.any(axis=0), dtype=np.bool_)
    if closes.shape[0] == 0:
        nothing = np.full(closes.shape[1], np.nan)
        return nothing, nothing.copy(), has
    cols = np.arange(closes.shape[1])
    first: FloatArray = closes[np.argmax(valid, axis=0), cols]
    last: FloatArray = closes[closes.shape[0] - 1 - np.argmax(valid[::-1], axis=0), cols]
    first[~has] = np.nan
    last[~has] = np.nan
    return first, last, has


def _return_stats(returns: FloatArray, periods_per_year: float, risk_free_rate: float) -> dict[str, FloatArray]:
    if returns.shape[0] == 0:  # an empty range: reductions need at least one (NaN) row
        returns = np.full((1, returns.shape[1]), np.nan)
    valid = ~np.isnan(returns)
    n = valid.sum(axis=0)
    with _quiet():
        mean = np.nanmean(returns, axis=0)
        std = np.nanstd(returns, axis=0, ddof=1)
        stats = {
            "n": n.astype(np.float64),
            "mean": mean,
            "median": np.nanmedian(returns, axis=0),
            "std": np.where(n >= 2, std, np.nan),
            "best": np.nanmax(returns, axis=0),
            "worst": np.nanmin(returns, axis=0),
            "positive_share": np.where(n > 0, (returns > 0).sum(axis=0) / n, np.nan),
        }
        root = math.sqrt(periods_per_year)
        stats["volatility"] = stats["std"] * root
        usable = stats["std"] > ZERO_STD
        stats["sharpe"] = np.where(usable, (mean - risk_free_rate / periods_per_year) / stats["std"] * root, np.nan)
    return stats


def _betas(returns: FloatArray, bench: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Beta of each column on ``bench`` over each column's common timestamps: (beta, common count, benchmark
    variance on those timestamps). The benchmark against itself is exactly 1 (same arithmetic both sides)."""
    both = ~np.isnan(returns) & ~np.isnan(bench)[:, None]
    n = both.sum(axis=0)
    with _quiet():
        rb = np.where(both, bench[:, None], 0.0)
        rc = np.where(both, returns, 0.0)
        db = np.where(both, rb - rb.sum(axis=0) / n, 0.0)
        dc = np.where(both, rc - rc.sum(axis=0) / n, 0.0)
        cov = (dc * db).sum(axis=0) / (n - 1)
        var = (db * db).sum(axis=0) / (n - 1)
        beta = np.where((n >= 2) & (var > ZERO_STD**2), cov / var, np.nan)
    return beta, n.astype(np.float64), np.where(n >= 2, var, np.nan)


def _correlation(returns: FloatArray, std: FloatArray, n: FloatArray) -> FloatArray:
    """Pairwise Pearson r on common timestamps; NaN where a pair has too few common returns or no variance."""
    k = returns.shape[1]
    if k == 0:
        return np.empty((0, 0))
    with _quiet():
        matrix = pd.DataFrame(returns).corr(min_periods=MIN_CORRELATION_RETURNS).to_numpy(dtype=np.float64)
    matrix = np.asarray(np.clip(matrix, -1.0, 1.0), dtype=np.float64)
    defined = (n >= MIN_CORRELATION_RETURNS) & (std > ZERO_STD)
    matrix[np.diag_indices(k)] = np.where(defined, 1.0, np.nan)
    return matrix


def _max_drawdown(close: FloatArray, times: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Largest fall from a running high to a later low of the close series, with when it peaked, bottomed
    and got back to the peak. Missing candles are skipped: a drawdown is about levels, not steps."""
    nulls: dict[str, str] = {}
    result: dict[str, Any] = {"pct": None, "peak_at": None, "trough_at": None, "recovered_at": None}
    positions = np.flatnonzero(~np.isnan(close))
    if positions.size < 2:
        nulls["max_drawdown"] = NO_CANDLES if positions.size == 0 else ONE_CANDLE
        return result, nulls
    prices = close[positions]
    drawdown = prices / np.maximum.accumulate(prices) - 1.0
    trough = int(np.argmin(drawdown))
    if drawdown[trough] >= 0:
        result["pct"] = 0.0
        for field in ("peak_at", "trough_at", "recovered_at"):
            nulls[f"max_drawdown.{field}"] = NO_DRAWDOWN
        return result, nulls
    # The first time the high was reached: the drawdown lasts from there (np.argmax takes the first).
    peak = int(np.argmax(prices[: trough + 1]))
    back = np.flatnonzero(prices[trough + 1 :] >= prices[peak])
    result["pct"] = pct_value(float(drawdown[trough]) * 100)
    result["peak_at"] = times[positions[peak]]
    result["trough_at"] = times[positions[trough]]
    if back.size:
        result["recovered_at"] = times[positions[trough + 1 + back[0]]]
    else:
        nulls["max_drawdown.recovered_at"] = NOT_RECOVERED
    return result, nulls


def _series_nulls(present: int, n_returns: int, std: float) -> dict[str, str]:
    """Why each level/return statistic of one coin is missing (shared by compare and analyze)."""
    nulls: dict[str, str] = {}
    if present == 0:
        nulls.update({"first": NO_CANDLES, "last": NO_CANDLES})
    if present < 2:
        nulls["total_return_pct"] = NO_CANDLES if present == 0 else ONE_CANDLE
    if n_returns < 2:
        reason = NO_RETURNS if n_returns == 0 else ONE_RETURN
        nulls["annualised_volatility_pct"] = reason
        nulls["sharpe"] = reason
    elif not std > ZERO_STD:
        nulls["sharpe"] = ZERO_VOLATILITY
    return nulls


def _periods_per_year(step_seconds: int) -> float:
    if step_seconds <= 0:
        raise ValueError(f"step_seconds must be positive, got {step_seconds}")
    return SECONDS_PER_YEAR / step_seconds


# ---------------------------------------------------------------- compare


def compare(
    candles: dict[str, pd.DataFrame],
    index: pd.DatetimeIndex,
    step_seconds: int,
    *,
    risk_free_rate: float = 0.0,
    benchmark: str = "BTC",
    benchmark_candles: pd.DataFrame | None = None,
    max_gap: int = 3,
) -> dict[str, Any]:
    """Side-by-side statistics of several coins on one time grid.

    ``risk_free_rate`` is annual, as a fraction (0.04 = 4%). Beta is against ``benchmark`` when it is one of
    the coins, else against ``benchmark_candles`` if given (the benchmark read alongside but not compared);
    without either, ``benchmark`` is None and each beta is null with the reason."""
    if not math.isfinite(risk_free_rate):
        raise ValueError("risk_free_rate must be a finite number")
    periods_per_year = _periods_per_year(step_seconds)
    symbols = list(candles)
    k, rows = len(symbols), len(index)

    closes = np.full((rows, k), np.nan)
    present_counts = np.zeros(k, dtype=np.int64)
    for j, symbol in enumerate(symbols):
        present, filled = _present_and_filled(candles[symbol], index, max_gap)
        closes[:, j] = filled
        present_counts[j] = np.count_nonzero(~np.isnan(present))

    returns = _simple_returns(closes)
    stats = _return_stats(returns, periods_per_year, risk_free_rate)
    first, last, has = _first_last(closes)
    with _quiet():
        total_return = np.where(present_counts >= 2, (last / first - 1.0) * 100, np.nan)
        normalised = closes / first * 100

    bench_name: str | None = None
    bench_returns: FloatArray | None = None
    if benchmark in candles:
        bench_name = benchmark
        bench_returns = returns[:, symbols.index(benchmark)]
    elif benchmark_candles is not None:
        bench_name = benchmark
        bench_returns = _simple_returns(_present_and_filled(benchmark_candles, index, max_gap)[1][:, None])[:, 0]
    if bench_returns is not None:
        betas, common, bench_var = _betas(returns, bench_returns)
    else:
        betas = common = bench_var = np.full(k, np.nan)

    correlation = _correlation(returns, stats["std"], stats["n"])
    times = iso_times(index)

    coins = []
    for j, symbol in enumerate(symbols):
        n_returns = int(stats["n"][j])
        nulls = _series_nulls(int(present_counts[j]), n_returns, float(stats["std"][j]))
        if n_returns == 0:
            nulls["periodic_returns"] = NO_RETURNS
        elif n_returns == 1:
            nulls["periodic_returns.std_pct"] = ONE_RETURN
        drawdown, drawdown_nulls = _max_drawdown(closes[:, j], times)
        nulls.update(drawdown_nulls)
        if bench_returns is None:
            nulls["beta"] = f"benchmark {benchmark} is not among the coins"
        elif not np.isfinite(betas[j]):
            if np.count_nonzero(~np.isnan(bench_returns)) < 2:
                nulls["beta"] = f"benchmark {benchmark} has fewer than 2 returns"
            elif common[j] < 2:
                nulls["beta"] = f"fewer than 2 returns in common with {benchmark}"
            elif not bench_var[j] > ZERO_STD**2:
                nulls["beta"] = f"zero volatility of {benchmark} on the common returns"
        coins.append(
            {
                "symbol": symbol,
                "candles": int(present_counts[j]),
                "expected": rows,
                "coverage": pct_value(present_counts[j] / rows if rows else 0.0),
                "first": price_value(first[j]),
                "last": price_value(last[j]),
                "total_return_pct": pct_value(total_return[j]),
                "periodic_returns": {
                    "mean_pct": pct_value(stats["mean"][j] * 100),
                    "median_pct": pct_value(stats["median"][j] * 100),
                    "std_pct": pct_value(stats["std"][j] * 100),
                    "best_pct": pct_value(stats["best"][j] * 100),
                    "worst_pct": pct_value(stats["worst"][j] * 100),
                    "positive_share": pct_value(stats["positive_share"][j]),
                },
                "annualised_volatility_pct": pct_value(stats["volatility"][j] * 100),
                "max_drawdown": drawdown,
                "sharpe": pct_value(stats["sharpe"][j]),
                "beta": pct_value(betas[j]),
                "nulls": nulls,
            }
        )

    missing = [s for s, h in zip(symbols, has, strict=True) if not h]
    empty = not bool(has.any())
    if rows == 0:
        note: str | None = "the range holds no complete interval"
    elif empty:
        note = "no candles in the range for any of the coins"
    elif missing:
        note = f"no candles in the range for: {', '.join(missing)}"
    else:
        note = None

    return {
        "benchmark": bench_name,
        "risk_free_rate": pct_value(risk_free_rate),
        "periods_per_year": pct_value(periods_per_year),
        "coins": coins,
        "correlation": {
            "symbols": symbols,
            "matrix": [pct_list(row) for row in correlation],
            "min_common_returns": MIN_CORRELATION_RETURNS,
        },
        "series": {
            "t": times,
            "normalised": {s: pct_list(normalised[:, j]) for j, s in enumerate(symbols)},
            "returns_pct": {s: pct_list(returns[:, j] * 100) for j, s in enumerate(symbols)},
        },
        "empty": empty,
        "note": note,
    }


# ---------------------------------------------------------------- analyze (one coin)


def _runs(valid: NDArray[np.bool_]) -> Iterator[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate(([0], valid.astype(np.int8), [0])))
    yield from zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True)


def _seeded_ema(values: FloatArray, period: int, alpha: float) -> FloatArray:
    """Exponential average seeded with the simple mean of the first ``period`` values (the usual TA
    definition; Wilder's smoothing is alpha = 1/period). It restarts after every unfilled gap: an average
    carried across a long outage would mix two unrelated markets. NaN until the window is full."""
    out = np.full(values.shape, np.nan)
    for start, end in _runs(~np.isnan(values)):
        if end - start < period:
            continue
        segment = values[start:end]
        tail = np.concatenate(([segment[:period].mean()], segment[period:]))
        out[start + period - 1 : end] = pd.Series(tail).ewm(alpha=alpha, adjust=False).mean().to_numpy()
    return out


def _rsi(close: FloatArray, period: int) -> FloatArray:
    delta = np.full(close.shape, np.nan)
    delta[1:] = close[1:] - close[:-1]
    with _quiet():
        gains = _seeded_ema(np.where(np.isnan(delta), np.nan, np.maximum(delta, 0.0)), period, 1.0 / period)
        losses = _seeded_ema(np.where(np.isnan(delta), np.nan, np.maximum(-delta, 0.0)), period, 1.0 / period)
        rsi = 100.0 - 100.0 / (1.0 + gains / losses)
    # No losses: 100 if it only rose; undefined (None) if the price did not move at all in the window.
    return np.where(losses > 0, rsi, np.where(gains > 0, 100.0, np.nan))


def _periods(name: str, values: Sequence[int]) -> list[int]:
    unique = list(dict.fromkeys(int(v) for v in values))
    if any(v < 1 for v in unique):
        raise ValueError(f"{name} periods must be at least 1, got {list(values)}")
    return unique


def analyze(
    candles: pd.DataFrame,
    index: pd.DatetimeIndex,
    step_seconds: int,
    *,
    sma: tuple[int, ...] = (20, 50),
    ema: tuple[int, ...] = (12, 26),
    rsi_period: int = 14,
    bollinger: tuple[int, float] = (20, 2.0),
    max_gap: int = 3,
    anomaly_window: int = 48,
    anomaly_threshold: float = 6.0,
) -> dict[str, Any]:
    """Summary statistics, moving averages, RSI (Wilder), Bollinger bands (population std, the usual
    definition) and anomalies of one coin. Indicators are None where their window is not full of candles."""
    # Imported here: the anomaly detector builds on this module's alignment and output helpers.
    from services.analytics.anomalies import anomaly_method, detect_anomalies

    periods_per_year = _periods_per_year(step_seconds)
    sma_periods, ema_periods = _periods("sma", sma), _periods("ema", ema)
    (rsi_period,) = _periods("rsi", (rsi_period,))
    band_window, band_k = _periods("bollinger", (bollinger[0],))[0], float(bollinger[1])
    if not math.isfinite(band_k) or band_k < 0:
        raise ValueError(f"bollinger k must be a non-negative number, got {bollinger[1]}")

    present, close = _present_and_filled(candles, index, max_gap)
    rows = len(index)
    n_present = int(np.count_nonzero(~np.isnan(present)))
    returns = _simple_returns(close[:, None])
    stats = _return_stats(returns, periods_per_year, 0.0)
    first, last, _ = _first_last(close[:, None])
    times = iso_times(index)
    drawdown, drawdown_nulls = _max_drawdown(close, times)
    n_returns = int(stats["n"][0])

    nulls = _series_nulls(n_present, n_returns, float(stats["std"][0]))
    nulls.pop("sharpe", None)
    if n_present == 0:
        nulls.update({"min": NO_CANDLES, "max": NO_CANDLES, "mean": NO_CANDLES, "median": NO_CANDLES})
    if n_present < 2:
        nulls["std"] = NO_CANDLES if n_present == 0 else ONE_CANDLE
    if "max_drawdown" in drawdown_nulls:
        nulls["max_drawdown_pct"] = drawdown_nulls["max_drawdown"]

    with _quiet():
        levels: dict[str, float] = {
            "min": float(np.nanmin(present)) if n_present else math.nan,
            "max": float(np.nanmax(present)) if n_present else math.nan,
            "mean": float(np.nanmean(present)) if n_present else math.nan,
            "median": float(np.nanmedian(present)) if n_present else math.nan,
            "std": float(np.nanstd(present, ddof=1)) if n_present >= 2 else math.nan,
        }
        # A constant price's std comes out as ~1e-16 of its level (the mean is not exact): that is 0.
        if levels["std"] <= ZERO_STD * abs(levels["mean"]):
            levels["std"] = 0.0
        total_return = (last[0] / first[0] - 1.0) * 100 if n_present >= 2 else np.nan

    series = pd.Series(close)
    indicators: dict[str, Any] = {"t": times, "close": price_list(close)}
    for period in sma_periods:
        indicators[f"sma_{period}"] = price_list(series.rolling(period, min_periods=period).mean().to_numpy())
    for period in ema_periods:
        indicators[f"ema_{period}"] = price_list(_seeded_ema(close, period, 2.0 / (period + 1)))
    indicators[f"rsi_{rsi_period}"] = pct_list(_rsi(close, rsi_period))
    window = series.rolling(band_window, min_periods=band_window)
    middle, spread = window.mean().to_numpy(), window.std(ddof=0).to_numpy() * band_k
    indicators["bollinger"] = {
        "window": band_window,
        "k": band_k,
        "middle": price_list(middle),
        "upper": price_list(middle + spread),
        "lower": price_list(middle - spread),
    }
    for name, period in [
        *((f"sma_{p}", p) for p in sma_periods),
        *((f"ema_{p}", p) for p in ema_periods),
        (f"rsi_{rsi_period}", rsi_period + 1),
        ("bollinger", band_window),
    ]:
        column = indicators[name]["middle"] if name == "bollinger" else indicators[name]
        if all(v is None for v in column):
            nulls[f"indicators.{name}"] = f"no run of {period} consecutive candles"

    baseline = anomaly_method(anomaly_window, anomaly_threshold)["min_baseline_points"]
    if n_present < baseline + 2:
        nulls["anomalies"] = f"fewer than {baseline + 2} candles: too few for a baseline of {baseline} points"
    if rows == 0:
        note: str | None = "the range holds no complete interval"
    elif n_present == 0:
        note = "no candles in the range"
    else:
        note = None

    return {
        "summary": {
            "first": price_value(first[0]),
            "last": price_value(last[0]),
            **{name: price_value(value) for name, value in levels.items()},
            "total_return_pct": pct_value(total_return),
            "annualised_volatility_pct": pct_value(stats["volatility"][0] * 100),
            "max_drawdown_pct": drawdown["pct"],
            "candles": n_present,
            "expected": rows,
            "coverage": pct_value(_coverage(present)),
        },
        "indicators": indicators,
        "anomalies": detect_anomalies(candles, index, window=anomaly_window, threshold=anomaly_threshold),
        "anomaly_method": anomaly_method(anomaly_window, anomaly_threshold),
        "nulls": nulls,
        "empty": n_present == 0,
        "note": note,
    }

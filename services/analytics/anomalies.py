"""Unusual moves and volumes: each interval's log return and volume scored against a robust baseline of the
previous ``window`` points (rolling median, and median absolute deviation scaled to a standard deviation).

Robust statistics because the thing being looked for, a spike, would inflate a mean and standard deviation
and hide itself and its neighbours; a median and MAD barely move for a few outliers in the window.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from services.analytics.stats import FloatArray, iso_times, pct_value, present_values, price_value

MAD_SCALE = 1.4826  # MAD * 1.4826 estimates the standard deviation of normally distributed data
# Fallback when more than half of the window is one value (MAD = 0, e.g. a market that did not trade):
# the mean absolute deviation around the median, scaled by sqrt(pi/2) to the same standard-deviation units;
# it is non-zero as soon as any point of the window differs.
MEAN_AD_SCALE = 1.2533
# The smallest scale a deviation is measured in, so a near-constant window cannot turn a negligible change
# into a huge score: one basis point of log return, and 1% of the window's median volume. A window of
# identical volumes of zero has no scale at all and is not scored (silence then trades is not an outlier
# of size).
RETURN_RESOLUTION = 1e-4
VOLUME_RESOLUTION = 0.01
# A baseline needs at least half of its window actually present.
MIN_BASELINE_SHARE = 0.5
# Bounds the windows materialised at once (rows x window float64) for long series.
CHUNK_ROWS = 16384

ANOMALY_METHOD: dict[str, Any] = {
    "name": "rolling median/MAD",
    "window": 48,
    "threshold": 6.0,
    "series": ["log return", "volume"],
    "baseline": "previous window points",
    "score": "|x - median| / (1.4826 * MAD)",
    "min_baseline_points": 24,
}


def anomaly_method(window: int = 48, threshold: float = 6.0) -> dict[str, Any]:
    """What ``detect_anomalies`` did with these parameters, for the response beside the anomalies."""
    return {
        **ANOMALY_METHOD,
        "window": window,
        "threshold": threshold,
        "min_baseline_points": _min_points(window),
    }


def _min_points(window: int) -> int:
    return max(2, int(np.ceil(window * MIN_BASELINE_SHARE)))


def _row_medians(sorted_rows: FloatArray, counts: NDArray[np.int64]) -> FloatArray:
    """Medians of rows sorted ascending with their NaNs last (np.sort's order), ``counts`` valid per row."""
    rows = np.arange(sorted_rows.shape[0])
    lo = np.clip((counts - 1) // 2, 0, None)
    hi = np.clip(counts // 2, 0, sorted_rows.shape[1] - 1)
    medians = (sorted_rows[rows, lo] + sorted_rows[rows, hi]) / 2.0
    return np.where(counts > 0, medians, np.nan)


def rolling_baseline(values: FloatArray, window: int) -> tuple[FloatArray, FloatArray, FloatArray]:
    """For each position t, the median, MAD and mean absolute deviation (around that median) of the
    previous ``window`` positions (t - window .. t - 1), NaNs skipped; NaN where fewer than the minimum
    points are present. Exact per-window medians, vectorised over sliding windows."""
    n = values.size
    median = np.full(n, np.nan)
    mad = np.full(n, np.nan)
    mean_ad = np.full(n, np.nan)
    if n == 0:
        return median, mad, mean_ad
    padded = np.concatenate((np.full(window, np.nan), values))
    views = np.lib.stride_tricks.sliding_window_view(padded, window)  # row t holds values[t - window : t]
    need = _min_points(window)
    for start in range(0, n, CHUNK_ROWS):
        block = views[start : min(start + CHUNK_ROWS, n)]
        counts = np.count_nonzero(~np.isnan(block), axis=1)
        centre = _row_medians(np.sort(block, axis=1), counts)
        deviations = np.abs(block - centre[:, None])
        spread = _row_medians(np.sort(deviations, axis=1), counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            average = np.nansum(deviations, axis=1) / counts
        enough = counts >= need
        stop = start + block.shape[0]
        median[start:stop] = np.where(enough, centre, np.nan)
        mad[start:stop] = np.where(enough, spread, np.nan)
        mean_ad[start:stop] = np.where(enough, average, np.nan)
    return median, mad, mean_ad


def robust_scores(
    values: FloatArray, window: int, *, floor: float = 0.0, relative_floor: float = 0.0
) -> tuple[FloatArray, FloatArray]:
    """(score, baseline median) per position; NaN where no baseline or no usable scale exists. The scale is
    never below ``floor`` nor below ``relative_floor`` times the baseline median's magnitude."""
    median, mad, mean_ad = rolling_baseline(values, window)
    scale = np.where(mad > 0, MAD_SCALE * mad, MEAN_AD_SCALE * mean_ad)
    scale = np.fmax(scale, np.fmax(floor, relative_floor * np.abs(median)))
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(scale > 0, np.abs(values - median) / scale, np.nan)
    return score, median


def _log_returns(close: FloatArray) -> FloatArray:
    """Log return between consecutive buckets where both candles are really there: filled gaps would add
    zero returns that shrink the baseline, and a return across a gap spans several intervals."""
    out = np.full(close.shape, np.nan)
    if close.size > 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            out[1:] = np.log(close[1:] / close[:-1])
    return out


def detect_anomalies(
    candles: pd.DataFrame, index: pd.DatetimeIndex, *, window: int = 48, threshold: float = 6.0
) -> list[dict[str, Any]]:
    """Intervals whose log return or volume is at least ``threshold`` robust standard deviations from the
    median of the previous ``window`` points, oldest first: ``{"t", "kind": "return"|"volume", "value",
    "baseline", "score", "direction": "up"|"down"}``. Returns are log returns (ratios), volumes as stored."""
    if window < 2:
        raise ValueError(f"anomaly window must be at least 2, got {window}")
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"anomaly threshold must be a positive number, got {threshold}")
    found: list[tuple[int, int, dict[str, Any]]] = []
    close = present_values(candles, index, "close", positive=True)
    volume = present_values(candles, index, "volume")
    volume[volume < 0] = np.nan
    for order, (kind, values) in enumerate((("return", _log_returns(close)), ("volume", volume))):
        if np.count_nonzero(~np.isnan(values)) <= _min_points(window):
            continue
        if kind == "return":
            score, median = robust_scores(values, window, floor=RETURN_RESOLUTION)
        else:
            score, median = robust_scores(values, window, relative_floor=VOLUME_RESOLUTION)
        with np.errstate(invalid="ignore"):
            hits = np.flatnonzero(np.isfinite(score) & (score >= threshold))
        if hits.size == 0:
            continue
        times = iso_times(index[hits])
        rounded = pct_value if kind == "return" else price_value
        for position, t in zip(hits.tolist(), times, strict=True):
            value, base = float(values[position]), float(median[position])
            found.append(
                (
                    position,
                    order,
                    {
                        "t": t,
                        "kind": kind,
                        "value": rounded(value),
                        "baseline": rounded(base),
                        "score": pct_value(float(score[position])),
                        "direction": "up" if value > base else "down",
                    },
                )
            )
    found.sort(key=lambda item: (item[0], item[1]))
    return [anomaly for _, _, anomaly in found]

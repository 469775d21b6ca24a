"""The analytics statistics core (services/analytics/stats.py, anomalies.py) on recorded prices.

Recorded crypto candles in the fixtures are few (three daily BTC-USDT candles from OKX and from KuCoin, one
Binance 1m kline), so the longer series are built from real recorded daily reference rates: the ECB's
90-day histories of 2012-10-29..2013-01-24 and 2016-12-05..2017-03-03 (ecb/eurofxref-hist-90d_*.xml).
A "coin" is the EUR value of one unit of a currency, scaled so it starts at a recorded crypto close (the OKX
BTC-USDT close of 2021-09-19, the Binance NKNUSDT kline close); the two periods are stitched end to end
(the second rescaled to continue from the first's last value) and laid on consecutive buckets of the test's
interval. Returns, and so every statistic, are the recorded day-to-day moves. Volumes, where a test needs
them, are the recorded Binance kline volume times the recorded day-to-day ratio of a second currency (a real,
calm series at a crypto volume level). Every expected value is computed here with numpy from the same
candles, independently of the code under test.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import defusedxml.ElementTree as ElementTree
import numpy as np
import pandas as pd
import pytest

from services.analytics.anomalies import ANOMALY_METHOD, detect_anomalies
from services.analytics.stats import align, analyze, compare, expected_index

HOUR = 3600
DAY = 86400
START = datetime(2024, 1, 1, tzinfo=UTC)
ECB_NS = "{http://www.ecb.int/vocabulary/2002-08-01/eurofxref}"
ECB_FILES = (
    "eurofxref-hist-90d_2012-10-29_to_2013-01-24.xml",
    "eurofxref-hist-90d_2016-12-05_to_2017-03-03.xml",
)
# The recorded rates are quoted to 4-6 significant digits; outputs are rounded to 6 decimals (percentages,
# ratios) or 8 significant digits (prices), so comparisons allow that rounding.
PCT = 2e-6


# ---------------------------------------------------------------- recorded data


def ecb_history(path: Path) -> pd.DataFrame:
    """Daily reference rates (units of currency per EUR), one column per currency, oldest first."""
    rows: dict[str, dict[str, float]] = {}
    root = ElementTree.parse(path).getroot()
    assert root is not None
    for day in root.iter(f"{ECB_NS}Cube"):
        if "time" in day.attrib:
            rows[day.attrib["time"]] = {c.attrib["currency"]: float(c.attrib["rate"]) for c in day}
    frame = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    frame.index = pd.DatetimeIndex(frame.index).tz_localize(UTC)
    return frame


@pytest.fixture(scope="module")
def ecb(exchange_fixtures: Path) -> list[pd.DataFrame]:
    return [ecb_history(exchange_fixtures / "ecb" / name) for name in ECB_FILES]


@pytest.fixture(scope="module")
def okx_btc(exchange_fixtures: Path) -> pd.DataFrame:
    """The three recorded OKX BTC-USDT daily candles (2021-09-19..21)."""
    body = json.loads((exchange_fixtures / "okx" / "rec_api_v5_market_candles_BTC-USDT_1Dutc_3rows.json").read_text())
    rows = [(int(r[0]) // 1000, float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5])) for r in body["data"]]
    return candles_from_rows(rows)


@pytest.fixture(scope="module")
def kucoin_btc(exchange_fixtures: Path) -> pd.DataFrame:
    """The three recorded KuCoin BTC-USDT daily candles (rows are t, open, close, high, low, volume)."""
    body = json.loads((exchange_fixtures / "kucoin" / "rec_api_v1_market_candles_BTC-USDT_1day_3rows.json").read_text())
    rows = [(int(r[0]), float(r[1]), float(r[3]), float(r[4]), float(r[2]), float(r[5])) for r in body["data"]]
    return candles_from_rows(rows)


@pytest.fixture(scope="module")
def nkn_kline(exchange_fixtures: Path) -> dict[str, Any]:
    body = json.loads((exchange_fixtures / "binance" / "rec_ws_combined_kline_1m_NKNUSDT.json").read_text())
    # The candle ("k") with the event time ("E") it was pushed at.
    kline: dict[str, Any] = {**body["data"]["k"], "E": body["data"]["E"]}
    return kline


def candles_from_rows(rows: list[tuple[int, float, float, float, float, float]]) -> pd.DataFrame:
    """Candles as PostgreSQL hands them to pandas: microsecond UTC index, float64 columns, oldest first."""
    frame = pd.DataFrame(rows, columns=["t", "open", "high", "low", "close", "volume"]).sort_values("t")
    index = pd.DatetimeIndex(pd.to_datetime(frame.pop("t"), unit="s", utc=True)).as_unit("us")
    return frame.set_index(index)


def stitched(ecb: list[pd.DataFrame], currency: str) -> np.ndarray:
    """EUR value of one unit of ``currency`` over both recorded periods, the second continuing the first."""
    first, second = (1.0 / part[currency].to_numpy() for part in ecb)
    return np.concatenate((first, second[1:] * first[-1] / second[0]))


def series_from(ecb: list[pd.DataFrame], currency: str, level: float) -> np.ndarray:
    values = stitched(ecb, currency)
    scaled: np.ndarray = values / values[0] * level
    return scaled


def frame(closes: np.ndarray, index: pd.DatetimeIndex, volume: np.ndarray | None = None) -> pd.DataFrame:
    """Candles with the given closes on ``index`` (rows with a NaN close are left out, as missing candles)."""
    data = pd.DataFrame(
        {
            "open": closes,
            "high": closes,
            "low": closes,
            "close": closes,
            "volume": np.full(closes.size, np.nan) if volume is None else volume,
        },
        index=index.as_unit("us"),
    )
    return data[~np.isnan(closes)]


def grid(points: int, step: int = HOUR) -> pd.DatetimeIndex:
    return expected_index(START, START + timedelta(seconds=step * points), step)


def common_returns(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    both = ~np.isnan(a) & ~np.isnan(b)
    return a[both], b[both]


def assert_json_safe(result: Any) -> None:
    json.dumps(result, allow_nan=False)


# ---------------------------------------------------------------- time grid


def test_expected_index_is_aligned_to_the_epoch(nkn_kline: dict[str, Any]) -> None:
    # The recorded kline's event time, 2021-10-12T00:28:43.963Z, lies inside its minute bucket.
    event = datetime.fromtimestamp(nkn_kline["E"] / 1000, tz=UTC)
    minutes = expected_index(event, event + timedelta(minutes=3), 60)
    assert int(minutes[0].timestamp() * 1000) == nkn_kline["t"]
    assert [t.isoformat() for t in minutes] == [
        "2021-10-12T00:28:00+00:00",
        "2021-10-12T00:29:00+00:00",
        "2021-10-12T00:30:00+00:00",
        "2021-10-12T00:31:00+00:00",
    ]
    hours = expected_index(datetime(2021, 10, 12, 0, 28, tzinfo=UTC), datetime(2021, 10, 12, 3, tzinfo=UTC), HOUR)
    assert [t.hour for t in hours] == [0, 1, 2]  # end excluded when it is a bucket start
    days = expected_index(datetime(2021, 9, 19, 12, tzinfo=UTC), datetime(2021, 9, 21, 0, 0, 1, tzinfo=UTC), DAY)
    assert [t.day for t in days] == [19, 20, 21]
    # A 4-hour step is aligned on the epoch, not on the start.
    four = expected_index(datetime(2021, 10, 12, 5, 59, tzinfo=UTC), datetime(2021, 10, 12, 13, tzinfo=UTC), 4 * HOUR)
    assert [t.hour for t in four] == [4, 8, 12]
    assert len(expected_index(START, START, HOUR)) == 0
    assert expected_index(START, START + timedelta(days=1), DAY).tz is not None


# ---------------------------------------------------------------- compare against numpy


def test_compare_statistics_equal_numpy(ecb: list[pd.DataFrame]) -> None:
    """Three recorded series on consecutive hourly buckets, no gaps: every statistic against numpy."""
    closes = {
        "BTC": series_from(ecb, "USD", 47244.4),
        "ETH": series_from(ecb, "GBP", 3329.1),
        "SOL": series_from(ecb, "JPY", 152.37),
    }
    points = closes["BTC"].size
    index = grid(points)
    rf = 0.05
    result = compare({s: frame(c, index) for s, c in closes.items()}, index, HOUR, risk_free_rate=rf)
    assert_json_safe(result)

    ppy = 365 * 24
    assert result["periods_per_year"] == ppy
    assert result["benchmark"] == "BTC"
    assert result["empty"] is False and result["note"] is None
    returns = {s: c[1:] / c[:-1] - 1 for s, c in closes.items()}
    bench = returns["BTC"]
    by_symbol = {c["symbol"]: c for c in result["coins"]}
    for symbol, c in closes.items():
        coin, r = by_symbol[symbol], returns[symbol]
        assert coin["candles"] == coin["expected"] == points
        assert coin["coverage"] == 1.0
        assert coin["first"] == pytest.approx(c[0], rel=1e-7)
        assert coin["last"] == pytest.approx(c[-1], rel=1e-7)
        assert coin["total_return_pct"] == pytest.approx((c[-1] / c[0] - 1) * 100, abs=PCT)
        periodic = coin["periodic_returns"]
        assert periodic["mean_pct"] == pytest.approx(r.mean() * 100, abs=PCT)
        assert periodic["median_pct"] == pytest.approx(np.median(r) * 100, abs=PCT)
        assert periodic["std_pct"] == pytest.approx(r.std(ddof=1) * 100, abs=PCT)
        assert periodic["best_pct"] == pytest.approx(r.max() * 100, abs=PCT)
        assert periodic["worst_pct"] == pytest.approx(r.min() * 100, abs=PCT)
        assert periodic["positive_share"] == pytest.approx(np.mean(r > 0), abs=PCT)
        volatility = r.std(ddof=1) * math.sqrt(ppy) * 100
        assert coin["annualised_volatility_pct"] == pytest.approx(volatility, abs=PCT)
        sharpe = (r.mean() - rf / ppy) / r.std(ddof=1) * math.sqrt(ppy)
        assert coin["sharpe"] == pytest.approx(sharpe, abs=PCT)
        beta = np.cov(r, bench, ddof=1)[0, 1] / np.var(bench, ddof=1)
        assert coin["beta"] == pytest.approx(beta, abs=PCT)
        assert set(coin["nulls"]) <= {"max_drawdown.recovered_at"}
        normalised = result["series"]["normalised"][symbol]
        assert normalised[0] == 100.0
        assert np.allclose(normalised, c / c[0] * 100, atol=PCT)
        returns_pct = result["series"]["returns_pct"][symbol]
        assert returns_pct[0] is None
        assert np.allclose(returns_pct[1:], r * 100, atol=PCT)
    assert result["series"]["t"][0] == "2024-01-01T00:00:00Z"
    assert len(result["series"]["t"]) == points

    symbols = result["correlation"]["symbols"]
    expected = np.corrcoef(np.vstack([returns[s] for s in symbols]))
    assert np.allclose(np.array(result["correlation"]["matrix"], dtype=float), expected, atol=PCT)
    # The recorded series really move differently: the check is not vacuous.
    assert abs(expected[0, 1]) < 0.99


def test_self_correlation_and_btc_beta_are_one(ecb: list[pd.DataFrame]) -> None:
    btc = series_from(ecb, "USD", 47244.4)
    index = grid(btc.size)
    candles = {
        "BTC": frame(btc, index),
        "WBTC": frame(btc * 1.001, index),
        "ETH": frame(series_from(ecb, "CAD", 3329.1), index),
    }
    result = compare(candles, index, HOUR)
    coins = {c["symbol"]: c for c in result["coins"]}
    assert coins["BTC"]["beta"] == 1.0
    assert coins["WBTC"]["beta"] == pytest.approx(1.0, abs=PCT)
    assert coins["ETH"]["beta"] != pytest.approx(1.0, abs=0.01)
    matrix = result["correlation"]["matrix"]
    assert [matrix[i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert matrix[0][1] == pytest.approx(1.0, abs=PCT)
    assert matrix[0][2] == matrix[2][0]
    assert matrix[0][2] < 0.99


def test_compare_with_gaps_uses_only_consecutive_candles(ecb: list[pd.DataFrame]) -> None:
    """Recorded business-day rates on their real calendar days: weekends and holidays are missing candles.
    With max_gap=0 nothing is filled, so returns exist only between two consecutive present days."""
    part = ecb[0]
    index = expected_index(part.index[0].to_pydatetime(), part.index[-1].to_pydatetime() + timedelta(days=1), DAY)
    on_grid = {
        "BTC": (1.0 / part["USD"]).reindex(index).to_numpy() * 47244.4,
        "ETH": (1.0 / part["GBP"]).reindex(index).to_numpy() * 3329.1,
    }
    candles = {s: frame(c, index) for s, c in on_grid.items()}
    result = compare(candles, index, DAY, max_gap=0)
    assert_json_safe(result)
    coins = {c["symbol"]: c for c in result["coins"]}
    returns = {s: c[1:] / c[:-1] - 1 for s, c in on_grid.items()}  # NaN across every missing day
    for symbol, r in returns.items():
        valid = r[~np.isnan(r)]
        assert 0 < valid.size < r.size
        coin = coins[symbol]
        assert coin["candles"] == part.shape[0]
        assert coin["coverage"] == pytest.approx(part.shape[0] / len(index), abs=1e-6)
        assert coin["periodic_returns"]["mean_pct"] == pytest.approx(valid.mean() * 100, abs=PCT)
        volatility = valid.std(ddof=1) * math.sqrt(365) * 100
        assert coin["annualised_volatility_pct"] == pytest.approx(volatility, abs=PCT)
    a, b = common_returns(returns["ETH"], returns["BTC"])
    assert coins["ETH"]["beta"] == pytest.approx(np.cov(a, b)[0, 1] / np.var(b, ddof=1), abs=PCT)
    assert result["correlation"]["matrix"][0][1] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=PCT)

    # With the default max_gap=3, weekends (2 days) are bridged: the Monday return spans Friday..Monday.
    filled = compare(candles, index, DAY)
    monday = next(i for i, t in enumerate(index) if t.weekday() == 0 and not np.isnan(on_grid["BTC"][i]) and i > 3)
    friday = monday - 3
    assert filled["series"]["returns_pct"]["BTC"][monday] == pytest.approx(
        (on_grid["BTC"][monday] / on_grid["BTC"][friday] - 1) * 100, abs=PCT
    )
    assert filled["series"]["returns_pct"]["BTC"][monday - 1] == 0.0  # Sunday carries Friday's close
    assert result["series"]["returns_pct"]["BTC"][monday] is None


def test_benchmark_outside_the_comparison(ecb: list[pd.DataFrame]) -> None:
    btc = series_from(ecb, "USD", 47244.4)
    eth = series_from(ecb, "GBP", 3329.1)
    index = grid(btc.size)
    without = compare({"ETH": frame(eth, index), "SOL": frame(series_from(ecb, "AUD", 152.37), index)}, index, HOUR)
    assert without["benchmark"] is None
    assert all(c["beta"] is None and "BTC" in c["nulls"]["beta"] for c in without["coins"])
    assert_json_safe(without)

    separate = compare({"ETH": frame(eth, index)}, index, HOUR, benchmark_candles=frame(btc, index))
    r, b = eth[1:] / eth[:-1] - 1, btc[1:] / btc[:-1] - 1
    assert separate["benchmark"] == "BTC"
    assert separate["coins"][0]["beta"] == pytest.approx(np.cov(r, b)[0, 1] / np.var(b, ddof=1), abs=PCT)


def test_too_few_common_returns_leave_correlation_null(okx_btc: pd.DataFrame, kucoin_btc: pd.DataFrame) -> None:
    """The recorded 3-day BTC-USDT candles of two exchanges: two returns each, numbers still exact."""
    index = expected_index(datetime(2021, 9, 19, tzinfo=UTC), datetime(2021, 9, 22, tzinfo=UTC), DAY)
    result = compare({"BTC": okx_btc, "KBTC": kucoin_btc}, index, DAY)
    assert_json_safe(result)
    okx = okx_btc["close"].to_numpy()
    coin = result["coins"][0]
    assert coin["first"] == 47244.4 and coin["last"] == 40730.3
    assert coin["total_return_pct"] == pytest.approx((okx[-1] / okx[0] - 1) * 100, abs=PCT)
    assert coin["max_drawdown"]["pct"] == pytest.approx((okx.min() / okx[0] - 1) * 100, abs=PCT)
    assert result["coins"][1]["beta"] is not None
    # Two points always correlate at +-1: not reported as a correlation.
    assert result["correlation"]["matrix"] == [[None, None], [None, None]]


# ---------------------------------------------------------------- drawdown


def test_drawdown_finds_the_built_peak_trough_and_recovery(ecb: list[pd.DataFrame]) -> None:
    """Recorded day-to-day moves on top of a built path: up 40% to position 30, down to -45% at 60, back above
    the peak at about 100. The path's steps (about 1-2.7% a bucket) outweigh the recorded moves (about 0.45%),
    so the extremes are where they were built; the exact values are checked against numpy on the same closes."""
    noise = stitched(ecb, "GBP")
    noise = noise / noise[0]
    points = noise.size
    path = np.concatenate(
        (np.linspace(1.0, 1.4, 31), np.linspace(1.4, 0.77, 31)[1:], np.linspace(0.77, 1.6, points - 61 + 1)[1:])
    )
    closes = path * noise * 47244.4
    index = grid(points)
    result = compare({"BTC": frame(closes, index)}, index, HOUR)
    drawdown = result["coins"][0]["max_drawdown"]

    running = np.maximum.accumulate(closes)
    trough = int(np.argmin(closes / running - 1))
    peak = int(np.argmax(closes[: trough + 1]))
    recovered = trough + int(np.argmax(closes[trough:] >= closes[peak]))
    assert (peak, trough) == (30, 60)
    assert 61 < recovered < points
    times = result["series"]["t"]
    assert drawdown == {
        "pct": pytest.approx((closes[trough] / closes[peak] - 1) * 100, abs=PCT),
        "peak_at": times[peak],
        "trough_at": times[trough],
        "recovered_at": times[recovered],
    }
    assert drawdown["pct"] < -40

    # Cut before the recovery: no recovered_at, and the reason says so.
    cut = compare({"BTC": frame(closes[:recovered], index[:recovered])}, index[:recovered], HOUR)["coins"][0]
    assert cut["max_drawdown"]["recovered_at"] is None
    assert cut["max_drawdown"]["trough_at"] == times[trough]
    assert "recovered" in cut["nulls"]["max_drawdown.recovered_at"]

    # Only ever rising: a drawdown of 0 and no dates.
    rising = compare({"BTC": frame(np.sort(closes), index)}, index, HOUR)["coins"][0]
    assert rising["max_drawdown"] == {"pct": 0.0, "peak_at": None, "trough_at": None, "recovered_at": None}
    assert_json_safe(rising)


# ---------------------------------------------------------------- gaps and coverage


def test_gaps_longer_than_max_gap_are_not_filled(ecb: list[pd.DataFrame], nkn_kline: dict[str, Any]) -> None:
    closes = series_from(ecb, "JPY", float(nkn_kline["c"]))[:60]
    index = grid(closes.size)
    missing = [0, 10, 20, 21, 22, 40, 41, 42, 43, 44, 58, 59]  # leading, 1, 3 (= max_gap), 5, trailing
    holed = closes.copy()
    holed[missing] = np.nan
    candles = frame(holed, index)
    # A candle off the grid (mid-bucket) is not one of the expected candles.
    stray = candles.iloc[[5]].copy()
    stray.index = stray.index + pd.Timedelta(minutes=30)
    candles = pd.concat([candles, stray]).sort_index()

    aligned, coverage = align(candles, index)
    assert coverage == (60 - len(missing)) / 60
    values = aligned.to_numpy()
    assert np.isnan(values[0])  # nothing before the first candle to carry
    assert values[10] == closes[9]
    assert values[20] == values[21] == values[22] == closes[19]
    assert np.isnan(values[40:45]).all()  # 5 missing > max_gap 3: left missing
    assert np.isnan(values[58:]).all()  # after the last candle: not invented
    assert values[45] == closes[45]
    strict, _ = align(candles, index, max_gap=0)
    assert np.isnan(strict.to_numpy()[[10, 20, 21, 22]]).all()

    result = compare({"BTC": candles}, index, HOUR)
    returns = result["series"]["returns_pct"]["BTC"]
    assert returns[45] is None  # no return across the unfilled gap
    assert returns[11] == pytest.approx((closes[11] / closes[9] - 1) * 100, abs=PCT)
    assert result["series"]["normalised"]["BTC"][1] == 100.0
    assert result["coins"][0]["coverage"] == pytest.approx(48 / 60, abs=1e-6)
    assert result["coins"][0]["candles"] == 48
    assert_json_safe(result)


# ---------------------------------------------------------------- analyze against independent indicators


def ema_reference(x: np.ndarray, period: int, alpha: float) -> np.ndarray:
    out = np.full(x.size, np.nan)
    out[period - 1] = x[:period].mean()
    for i in range(period, x.size):
        out[i] = alpha * x[i] + (1 - alpha) * out[i - 1]
    return out


def rsi_reference(x: np.ndarray, period: int) -> np.ndarray:
    delta = np.diff(x)
    gain, loss = np.maximum(delta, 0), np.maximum(-delta, 0)
    out = np.full(x.size, np.nan)
    avg_gain, avg_loss = gain[:period].mean(), loss[:period].mean()
    out[period] = 100 - 100 / (1 + avg_gain / avg_loss)
    for i in range(period, delta.size):
        avg_gain = (avg_gain * (period - 1) + gain[i]) / period
        avg_loss = (avg_loss * (period - 1) + loss[i]) / period
        out[i + 1] = 100 - 100 / (1 + avg_gain / avg_loss)
    return out


def windows(x: np.ndarray, n: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(x, n)


def as_float(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def test_analyze_equals_independent_indicators(ecb: list[pd.DataFrame]) -> None:
    closes = series_from(ecb, "USD", 47244.4)
    index = grid(closes.size)
    result = analyze(frame(closes, index), index, HOUR)
    assert_json_safe(result)
    summary = result["summary"]
    r = closes[1:] / closes[:-1] - 1
    assert summary["first"] == pytest.approx(closes[0], rel=1e-7)
    assert summary["min"] == pytest.approx(closes.min(), rel=1e-7)
    assert summary["max"] == pytest.approx(closes.max(), rel=1e-7)
    assert summary["mean"] == pytest.approx(closes.mean(), rel=1e-7)
    assert summary["median"] == pytest.approx(np.median(closes), rel=1e-7)
    assert summary["std"] == pytest.approx(closes.std(ddof=1), rel=1e-7)
    assert summary["total_return_pct"] == pytest.approx((closes[-1] / closes[0] - 1) * 100, abs=PCT)
    assert summary["annualised_volatility_pct"] == pytest.approx(r.std(ddof=1) * math.sqrt(8760) * 100, abs=PCT)
    drawdown = (closes / np.maximum.accumulate(closes) - 1).min() * 100
    assert summary["max_drawdown_pct"] == pytest.approx(drawdown, abs=PCT)
    assert (summary["candles"], summary["expected"], summary["coverage"]) == (closes.size, closes.size, 1.0)

    ind = result["indicators"]
    assert len(ind["t"]) == len(ind["close"]) == closes.size
    for n in (20, 50):
        got = as_float(ind[f"sma_{n}"])
        assert np.isnan(got[: n - 1]).all()
        assert np.allclose(got[n - 1 :], windows(closes, n).mean(axis=1), rtol=1e-7)
    for n in (12, 26):
        expected = ema_reference(closes, n, 2 / (n + 1))
        assert np.allclose(as_float(ind[f"ema_{n}"]), expected, rtol=1e-7, equal_nan=True)
    rsi = as_float(ind["rsi_14"])
    assert np.isnan(rsi[:14]).all()
    assert np.allclose(rsi, rsi_reference(closes, 14), atol=PCT, equal_nan=True)
    assert np.nanmin(rsi) > 0 and np.nanmax(rsi) < 100
    band = ind["bollinger"]
    assert (band["window"], band["k"]) == (20, 2.0)
    mid, sd = windows(closes, 20).mean(axis=1), windows(closes, 20).std(axis=1, ddof=0)
    assert np.allclose(as_float(band["middle"])[19:], mid, rtol=1e-7)
    assert np.allclose(as_float(band["upper"])[19:], mid + 2 * sd, rtol=1e-7)
    assert np.allclose(as_float(band["lower"])[19:], mid - 2 * sd, rtol=1e-7)
    assert band["upper"][18] is None
    assert result["anomaly_method"]["name"] == ANOMALY_METHOD["name"]
    assert result["anomaly_method"]["window"] == 48 and result["anomaly_method"]["threshold"] == 6.0


def test_indicators_restart_after_an_unfilled_gap(ecb: list[pd.DataFrame]) -> None:
    closes = series_from(ecb, "GBP", 3329.1)
    index = grid(closes.size)
    holed = closes.copy()
    holed[60:66] = np.nan  # 6 missing: longer than max_gap, so the series is cut in two
    ind = analyze(frame(holed, index), index, HOUR)["indicators"]
    after = closes[66:]
    assert all(v is None for v in ind["sma_20"][60 : 66 + 19])
    assert ind["sma_20"][66 + 19] == pytest.approx(after[:20].mean(), rel=1e-7)
    assert np.allclose(as_float(ind["ema_12"])[66:], ema_reference(after, 12, 2 / 13), rtol=1e-7, equal_nan=True)
    assert np.allclose(as_float(ind["rsi_14"])[66:], rsi_reference(after, 14), atol=PCT, equal_nan=True)


# ---------------------------------------------------------------- anomalies


def volume_series(ecb: list[pd.DataFrame], nkn_kline: dict[str, Any], points: int) -> np.ndarray:
    ratio = stitched(ecb, "SEK")
    volume: np.ndarray = float(nkn_kline["v"]) * ratio[:points] / ratio[0]
    return volume


def test_calm_recorded_series_have_no_anomalies(ecb: list[pd.DataFrame], nkn_kline: dict[str, Any]) -> None:
    for currency in ("GBP", "JPY", "AUD", "NOK", "ZAR"):
        closes = series_from(ecb, currency, 47244.4)
        index = grid(closes.size)
        candles = frame(closes, index, volume_series(ecb, nkn_kline, closes.size))
        assert detect_anomalies(candles, index) == [], currency


def test_planted_spike_is_reported_at_its_time(ecb: list[pd.DataFrame], nkn_kline: dict[str, Any]) -> None:
    closes = series_from(ecb, "GBP", 47244.4)
    volume = volume_series(ecb, nkn_kline, closes.size)
    index = grid(closes.size)
    at = 100
    spiked, loud = closes.copy(), volume.copy()
    spiked[at] *= 1.05  # a 5% jump for one candle in a series whose typical move is about 0.4%
    loud[at + 5] *= 10  # ten times the volume five candles later
    anomalies = analyze(frame(spiked, index, loud), index, HOUR)["anomalies"]
    found = [(a["t"], a["kind"], a["direction"]) for a in anomalies]
    times = [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in index]
    # The jump and the fall back the next candle; nothing else.
    assert found == [(times[at], "return", "up"), (times[at + 1], "return", "down"), (times[at + 5], "volume", "up")]
    jump = anomalies[0]
    assert jump["value"] == pytest.approx(math.log(spiked[at] / spiked[at - 1]), abs=1e-6)
    r = np.diff(np.log(closes))[at - 1 - 48 : at - 1]
    assert jump["baseline"] == pytest.approx(np.median(r), abs=1e-6)
    mad = np.median(np.abs(r - np.median(r))) * 1.4826
    assert jump["score"] == pytest.approx(abs(jump["value"] - np.median(r)) / mad, rel=1e-4)
    assert jump["score"] >= 6
    assert anomalies[2]["value"] == pytest.approx(loud[at + 5], rel=1e-7)
    assert_json_safe(anomalies)


def test_flat_window_flags_only_a_clear_move(ecb: list[pd.DataFrame]) -> None:
    """The recorded BGN rate is pegged (1.9558 every day): MAD and mean deviation are 0, no division by
    zero; a move far below a basis point is not flagged, a 1% move is."""
    peg = stitched(ecb, "BGN")
    assert np.unique(peg).size == 1
    index = grid(peg.size)
    assert detect_anomalies(frame(peg, index, np.zeros(peg.size)), index) == []
    nudged = peg.copy()
    nudged[90:] *= 1 + 1e-7
    assert detect_anomalies(frame(nudged, index), index) == []
    moved = peg.copy()
    moved[90:] *= 1.01
    found = detect_anomalies(frame(moved, index), index)
    assert [(a["t"], a["kind"], a["direction"]) for a in found] == [("2024-01-04T18:00:00Z", "return", "up")]
    assert math.isfinite(found[0]["score"])


# ---------------------------------------------------------------- degenerate input stays JSON


def test_degenerate_input_is_json_without_nan(ecb: list[pd.DataFrame], okx_btc: pd.DataFrame) -> None:
    index = expected_index(datetime(2021, 9, 19, tzinfo=UTC), datetime(2021, 9, 29, tzinfo=UTC), DAY)
    peg = stitched(ecb, "BGN")[: len(index)]
    constant = frame(peg, index)  # all-NaN volume as well
    one = okx_btc.iloc[[0]]
    empty = okx_btc.iloc[0:0]
    zero_price = frame(np.where(np.arange(len(index)) == 3, 0.0, peg), index)
    # Exactly 1% a day: the returns' std is float noise (~1e-18), not a volatility to divide by.
    steady = frame(float(okx_btc["close"].iloc[0]) * 1.01 ** np.arange(len(index)), index)
    cases = {"BTC": one, "ETH": constant, "SOL": empty, "XRP": pd.DataFrame(), "DOGE": zero_price, "ADA": steady}

    result = compare(cases, index, DAY)
    assert_json_safe(result)
    coins = {c["symbol"]: c for c in result["coins"]}
    assert result["empty"] is False and "SOL" in result["note"] and "XRP" in result["note"]
    assert coins["BTC"]["candles"] == 1 and coins["BTC"]["total_return_pct"] is None
    assert coins["BTC"]["nulls"]["total_return_pct"] == "fewer than 2 candles"
    assert coins["ETH"]["sharpe"] is None and coins["ETH"]["nulls"]["sharpe"] == "zero volatility"
    assert coins["ETH"]["annualised_volatility_pct"] == 0.0 and coins["ETH"]["total_return_pct"] == 0.0
    assert coins["ETH"]["beta"] is None and "BTC" in coins["ETH"]["nulls"]["beta"]
    assert coins["SOL"]["first"] is None and coins["SOL"]["coverage"] == 0.0
    assert coins["DOGE"]["candles"] == len(index) - 1  # a zero price is no price
    assert coins["ADA"]["sharpe"] is None and coins["ADA"]["nulls"]["sharpe"] == "zero volatility"
    assert coins["ADA"]["periodic_returns"]["mean_pct"] == pytest.approx(1.0, abs=PCT)
    assert all(v is None for row in result["correlation"]["matrix"] for v in row)

    nothing = compare({"BTC": empty, "ETH": pd.DataFrame()}, index, DAY)
    assert nothing["empty"] is True and "any of the coins" in nothing["note"]
    assert_json_safe(nothing)
    no_range = compare({"BTC": okx_btc, "ETH": constant}, index[:0], DAY)
    assert no_range["empty"] is True and no_range["series"]["t"] == []
    assert_json_safe(no_range)

    for candles in (one, constant, empty, pd.DataFrame(), zero_price):
        analysed = analyze(candles, index, DAY)
        assert_json_safe(analysed)
        assert analysed["empty"] is (len(candles) == 0)
    flat = analyze(constant, index, DAY)
    assert all(v is None for v in flat["indicators"]["rsi_14"])  # no movement: RSI undefined, not 50 or NaN
    assert flat["summary"]["std"] == 0.0 and flat["summary"]["max_drawdown_pct"] == 0.0
    assert analyze(empty, index, DAY)["note"] == "no candles in the range"
    assert "baseline" in analyze(one, index, DAY)["nulls"]["anomalies"]
    assert "benchmark BTC has fewer than 2 returns" in coins["ADA"]["nulls"]["beta"]
    assert_json_safe(analyze(okx_btc, index[:0], DAY))

"""The analytics charts and CSV exports, built from recorded exchange data: pure functions, no servers.

Candles come from recorded payloads: OKX and KuCoin daily BTC-USDT candles (the same three days on two
exchanges), one-second candles aggregated from OKX's recorded BTC-USDT trades, and Binance's recorded
1-minute klines (LRCBTC trades at 0.00000638 BTC, the tiny-price case)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.offline
import pytest

from services.analytics import charts, export
from services.analytics.charts import NO_DATA

RECORDED = "cryptofeed-sample-data"


# --- recorded data -------------------------------------------------------------------------------------


def _frame(rows: list[list[float]], times: pd.DatetimeIndex) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["open", "high", "low", "close", "volume"], index=times, dtype="float64")
    return frame.sort_index()


def okx_daily(fixtures: Path) -> pd.DataFrame:
    """OKX v5 candles: [ts ms, open, high, low, close, volume, ...], newest first."""
    data = json.loads((fixtures / "okx" / "rec_api_v5_market_candles_BTC-USDT_1Dutc_3rows.json").read_text())["data"]
    times = pd.to_datetime([int(r[0]) for r in data], unit="ms", utc=True)
    return _frame([[float(v) for v in r[1:6]] for r in data], pd.DatetimeIndex(times))


def kucoin_daily(fixtures: Path) -> pd.DataFrame:
    """KuCoin candles: [ts s, open, close, high, low, volume, turnover], newest first."""
    data = json.loads((fixtures / "kucoin" / "rec_api_v1_market_candles_BTC-USDT_1day_3rows.json").read_text())["data"]
    times = pd.to_datetime([int(r[0]) for r in data], unit="s", utc=True)
    rows = [[float(r[1]), float(r[3]), float(r[4]), float(r[2]), float(r[5])] for r in data]
    return _frame(rows, pd.DatetimeIndex(times))


def recorded_messages(path: Path) -> list[dict[str, Any]]:
    """The JSON messages of a cryptofeed recording (lines ``<time>: <json>``; URL lines are skipped)."""
    messages = []
    for line in path.read_text().splitlines():
        _, sep, body = line.partition(": ")
        if sep and body.startswith("{"):
            messages.append(json.loads(body))
    return messages


def okx_entries(fixtures: Path, channel: str) -> list[dict[str, Any]]:
    arg = {"channel": channel, "instId": "BTC-USDT"}
    messages = recorded_messages(fixtures / RECORDED / "OKX.ws.1.0")
    return [entry for m in messages if m.get("arg") == arg and "data" in m for entry in m["data"]]


def okx_trades(fixtures: Path) -> pd.DataFrame:
    trades = okx_entries(fixtures, "trades")
    times = pd.to_datetime([int(t["ts"]) for t in trades], unit="ms", utc=True)
    frame = pd.DataFrame(
        {"price": [float(t["px"]) for t in trades], "size": [float(t["sz"]) for t in trades]}, index=times
    )
    return frame.sort_index(kind="stable")


def okx_second_candles(fixtures: Path) -> pd.DataFrame:
    """One-second OHLCV from the recorded trades; seconds without a trade have no candle, as in the store."""
    trades = okx_trades(fixtures)
    grouped = trades.groupby(trades.index.floor("1s"))
    frame = pd.DataFrame(
        {
            "open": grouped["price"].first(),
            "high": grouped["price"].max(),
            "low": grouped["price"].min(),
            "close": grouped["price"].last(),
            "volume": grouped["size"].sum(),
        }
    )
    assert len(frame) >= 10
    return frame


def binance_klines(fixtures: Path) -> dict[str, pd.DataFrame]:
    messages = recorded_messages(fixtures / RECORDED / "BINANCE.ws.1.0")
    out: dict[str, pd.DataFrame] = {}
    for message in messages:
        data = message.get("data", {})
        if data.get("e") != "kline":
            continue
        k = data["k"]
        times = pd.DatetimeIndex(pd.to_datetime([k["t"]], unit="ms", utc=True))
        out[k["s"]] = _frame([[float(k[f]) for f in ("o", "h", "l", "c", "v")]], times)
    return out


def compare_result(fixtures: Path) -> dict[str, Any]:
    """A stats.compare-shaped result for OKX's and KuCoin's BTC-USDT, computed here with numpy."""
    closes = {"OKX": okx_daily(fixtures)["close"], "KUCOIN": kucoin_daily(fixtures)["close"]}
    times = closes["OKX"].index
    normalised = {s: [float(v) for v in c.to_numpy() / c.to_numpy()[0] * 100.0] for s, c in closes.items()}
    returns = np.array([np.diff(np.log(c.to_numpy())) for c in closes.values()])
    matrix = np.corrcoef(returns).tolist()
    return {
        "coins": [{"symbol": "OKX"}, {"symbol": "KUCOIN"}],
        "correlation": {"symbols": ["OKX", "KUCOIN"], "matrix": matrix},
        "series": {"t": [t.isoformat() for t in times], "normalised": normalised, "returns_pct": {}},
    }


# --- helpers -------------------------------------------------------------------------------------------


def roundtrip(fig: go.Figure) -> dict[str, Any]:
    """The figure's JSON, checked to be strict JSON without typed arrays and a valid Plotly figure."""
    data = charts.figure_json(fig)
    text = json.dumps(data, allow_nan=False)
    assert "bdata" not in text
    go.Figure(data)
    return data


def traces(data: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(t["type"], t.get("name")) for t in data["data"]]


def named(data: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [t for t in data["data"] if t.get("name") == name]
    assert len(found) == 1, f"expected one trace named {name!r}, got {traces(data)}"
    return found[0]


def iso(moment: pd.Timestamp) -> str:
    text: str = moment.tz_convert("UTC").isoformat()
    return text.replace("+00:00", "Z")


def anomaly(moment: pd.Timestamp | str, kind: str, direction: str = "up", **extra: Any) -> dict[str, Any]:
    t = moment if isinstance(moment, str) else moment.isoformat()
    return {"t": t, "kind": kind, "value": 0.02, "baseline": 0.001, "score": 7.5, "direction": direction, **extra}


def no_data(data: dict[str, Any]) -> bool:
    texts = [a.get("text") for a in data["layout"].get("annotations", [])]
    return data["data"] == [] and texts == [NO_DATA]


# --- figures -------------------------------------------------------------------------------------------


def test_history_figure_marks_anomalies_at_their_times(exchange_fixtures: Path) -> None:
    candles = okx_second_candles(exchange_fixtures)
    close = candles["close"]
    returns = close.pct_change().abs()
    jump = returns.idxmax()
    busiest = candles["volume"].idxmax()
    inside = candles.index[2] + pd.Timedelta(milliseconds=700)
    anomalies = [
        anomaly(jump, "return", "down" if close[jump] < close.shift()[jump] else "up"),
        anomaly(inside, "return", "up"),
        anomaly(busiest, "volume", "up"),
        # Before the first candle, malformed, or of an unknown kind: left out, not an error.
        anomaly(candles.index[0] - pd.Timedelta(minutes=5), "return"),
        anomaly("not a time", "return"),
        {"kind": "volume"},
        anomaly(jump, "spread"),
    ]
    data = roundtrip(charts.history_figure("btc", "usdt", candles, anomalies))

    assert traces(data) == [
        ("scatter", "Price"),
        ("bar", "Volume"),
        ("scatter", "Return anomalies"),
        ("scatter", "Volume anomalies"),
    ]
    price = named(data, "Price")
    assert price["y"] == close.tolist()
    assert price["x"] == [iso(t) for t in candles.index]
    assert "USDT" in price["hovertemplate"]
    assert named(data, "Volume")["y"] == candles["volume"].tolist()

    marks = named(data, "Return anomalies")
    assert marks["mode"] == "markers"
    assert marks["x"] == [iso(jump), iso(inside)]
    # A mark sits on the candle whose bucket holds its time.
    assert marks["y"] == [close[jump], close.iloc[2]]
    assert marks["yaxis"] == price["yaxis"]
    assert marks["marker"]["symbol"][1] == "triangle-up"
    assert all("score 7.5" in text for text in marks["text"])
    # Return anomalies come as log returns; the hover says the percent change they stand for.
    assert "+2.02%" in marks["text"][1] and "typical +0.10%" in marks["text"][1]
    volume_marks = named(data, "Volume anomalies")
    assert volume_marks["x"] == [iso(busiest)]
    assert volume_marks["y"] == [candles["volume"][busiest]]
    assert volume_marks["yaxis"] == named(data, "Volume")["yaxis"] != price["yaxis"]

    layout = data["layout"]
    assert layout["title"]["text"] == "BTC price in USDT"
    assert layout["yaxis"]["title"]["text"] == "Price (USDT)"
    assert layout["yaxis2"]["title"]["text"] == "Volume (BTC)"


def test_history_figure_breaks_the_line_only_across_long_gaps(exchange_fixtures: Path) -> None:
    candles = okx_second_candles(exchange_fixtures)
    # The recording already misses one second; a one-step gap is bridged.
    assert (candles.index.to_series().diff().dropna() > pd.Timedelta(seconds=1)).any()
    data = roundtrip(charts.history_figure("BTC", "USDT", candles, []))
    assert None not in named(data, "Price")["y"]

    gapped = candles.drop(candles.index[5:9])
    before, after = gapped.index[4], gapped.index[5]
    assert after - before >= pd.Timedelta(seconds=5)
    price = named(roundtrip(charts.history_figure("BTC", "USDT", gapped, [])), "Price")
    breaks = [x for x, y in zip(price["x"], price["y"], strict=True) if y is None]
    assert len(breaks) == 1
    assert iso(before) < breaks[0] < iso(after)


def test_history_figure_without_volume_keeps_json_clean(exchange_fixtures: Path) -> None:
    candles = okx_daily(exchange_fixtures)
    candles["volume"] = np.nan
    candles.iloc[1, candles.columns.get_loc("close")] = np.nan
    data = roundtrip(charts.history_figure("BTC", "USDT", candles, [anomaly(candles.index[2], "volume")]))
    assert named(data, "Volume")["y"] == [None, None, None]
    price = named(data, "Price")["y"]
    assert price[1] is None and price[0] == candles["close"].iloc[0]
    # No volume to sit on: the volume anomaly is not drawn.
    assert traces(data) == [("scatter", "Price"), ("bar", "Volume")]
    assert "no volume for these candles" in [a["text"] for a in data["layout"]["annotations"]]


def test_candles_figure_carries_the_recorded_ohlc(exchange_fixtures: Path) -> None:
    candles = kucoin_daily(exchange_fixtures)
    data = roundtrip(charts.candles_figure("BTC", "USDT", candles))
    assert traces(data) == [("candlestick", "BTC/USDT"), ("bar", "Volume")]
    stick = data["data"][0]
    # KuCoin sends open, close, high, low: the first recorded day (2021-09-19) opened 48294 and closed 47242.5.
    assert stick["x"][0] == "2021-09-19T00:00:00Z"
    assert (stick["open"][0], stick["high"][0], stick["low"][0], stick["close"][0]) == (
        48294,
        48366.5,
        46816.2,
        47242.5,
    )
    for field in ("open", "high", "low", "close"):
        assert stick[field] == candles[field].tolist()
    assert all(
        h >= max(o, c) and lo <= min(o, c)
        for o, h, lo, c in zip(*(stick[f] for f in ("open", "high", "low", "close")), strict=True)
    )
    assert "USDT" in stick["hovertemplate"]
    bars = data["data"][1]
    assert bars["y"] == candles["volume"].tolist()
    assert bars["marker"]["color"] == charts.VOLUME_COLOUR
    assert data["layout"]["xaxis"]["rangeslider"]["visible"] is False


def test_compare_figure_draws_one_normalised_line_per_coin(exchange_fixtures: Path) -> None:
    result = compare_result(exchange_fixtures)
    result["series"]["normalised"]["KUCOIN"][1] = None
    data = roundtrip(charts.compare_figure(result, "usdt"))
    assert traces(data) == [("scatter", "OKX"), ("scatter", "KUCOIN")]
    okx, kucoin = data["data"]
    assert okx["y"][0] == 100.0 and kucoin["y"][0] == 100.0
    assert okx["y"] == result["series"]["normalised"]["OKX"]
    assert kucoin["y"][1] is None
    assert okx["x"] == [iso(t) for t in okx_daily(exchange_fixtures).index]
    assert okx["customdata"][2] == pytest.approx(okx["y"][2] - 100)
    assert "USDT" in okx["hovertemplate"]
    assert [s["y0"] for s in data["layout"]["shapes"]] == [100]
    assert "USDT" in data["layout"]["title"]["text"]


def test_correlation_figure_is_a_fixed_scale_annotated_heatmap(exchange_fixtures: Path) -> None:
    result = compare_result(exchange_fixtures)
    matrix = result["correlation"]["matrix"]
    data = roundtrip(charts.correlation_figure(result))
    assert traces(data) == [("heatmap", "correlation")]
    heat = data["data"][0]
    assert heat["z"] == matrix
    assert heat["x"] == heat["y"] == ["OKX", "KUCOIN"]
    assert heat["text"][0][0] == "1.00"
    assert heat["text"][0][1] == f"{matrix[0][1]:.2f}"
    assert heat["texttemplate"] == "%{text}"
    # Rows in the columns' order from the top, so the diagonal of ones runs top-left to bottom-right.
    assert data["layout"]["yaxis"]["autorange"] == "reversed"

    # The scale stays -1..1 whatever the values; a value that could not be computed reads n/a.
    weak = {
        "correlation": {"symbols": ["BTC", "ETH", "SOL"], "matrix": [[1, 0.1, None], [0.1, 1, 0.2], [None, 0.2, 1]]}
    }
    heat = roundtrip(charts.correlation_figure(weak))["data"][0]
    assert (heat["zmin"], heat["zmax"]) == (-1, 1)
    assert heat["z"][0][2] is None and heat["text"][0][2] == "n/a"


def test_sources_figure_marks_only_prices_beyond_the_threshold(exchange_fixtures: Path) -> None:
    okx, kucoin = okx_daily(exchange_fixtures)["close"], kucoin_daily(exchange_fixtures)["close"]
    consolidated = (okx + kucoin) / 2
    sources = {"okx": okx.to_frame("price"), "kucoin": kucoin.to_frame("price")}
    deviations = {name: ((s["price"] - consolidated) / consolidated * 100).abs() for name, s in sources.items()}
    spread = sorted(v for d in deviations.values() for v in d)
    # A threshold between the smallest and the largest recorded deviation splits the points.
    outlier_pct = (spread[0] + spread[-1]) / 2
    expected = sorted((name, iso(t)) for name, d in deviations.items() for t, v in d.items() if v > outlier_pct)
    assert 0 < len(expected) < len(spread)

    data = roundtrip(charts.sources_figure("BTC", "USDT", sources, consolidated, outlier_pct=outlier_pct))
    assert [n for _, n in traces(data)][:3] == ["okx", "kucoin", "Consolidated"]
    assert named(data, "okx")["y"] == okx.tolist()
    assert named(data, "Consolidated")["y"] == consolidated.tolist()
    outliers = data["data"][3]
    assert outliers["name"].startswith("Outliers")
    assert sorted(zip(outliers["text"], outliers["x"], strict=True)) == expected
    for name, x, pct in zip(outliers["text"], outliers["x"], outliers["customdata"], strict=True):
        assert abs(pct) == pytest.approx(deviations[name][pd.Timestamp(x)])
    assert "USDT" in outliers["hovertemplate"]

    # Far enough apart, nothing is an outlier and no outlier trace is drawn.
    calm = roundtrip(charts.sources_figure("BTC", "USDT", sources, consolidated, outlier_pct=spread[-1] + 1))
    assert [n for _, n in traces(calm)] == ["okx", "kucoin", "Consolidated"]


def test_sources_figure_judges_each_trade_against_the_nearest_consolidated_price(exchange_fixtures: Path) -> None:
    trades = okx_trades(exchange_fixtures)
    tickers = okx_entries(exchange_fixtures, "tickers")
    consolidated = pd.Series(
        [float(t["last"]) for t in tickers], index=pd.to_datetime([int(t["ts"]) for t in tickers], unit="ms", utc=True)
    ).sort_index()
    consolidated = consolidated[~consolidated.index.duplicated(keep="last")]
    # The trades' times fall between the tickers': none matches exactly, the nearest one is used.
    assert not trades.index.isin(consolidated.index).all()
    planted = trades.index[len(trades) // 2]
    prices = trades["price"].groupby(level=0).last()
    prices[planted] *= 1.02
    data = roundtrip(
        charts.sources_figure("BTC", "USDT", {"okx": prices.to_frame("price")}, consolidated, outlier_pct=0.5)
    )
    outliers = named(data, next(n for _, n in traces(data) if n and n.startswith("Outliers")))
    assert outliers["x"] == [iso(planted)]
    assert outliers["y"] == [prices[planted]]
    assert outliers["text"] == ["okx"]
    assert outliers["customdata"][0] == pytest.approx(2.0, abs=0.2)


def test_sources_figure_refuses_a_meaningless_threshold(exchange_fixtures: Path) -> None:
    okx = okx_daily(exchange_fixtures)["close"]
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="outlier_pct"):
            charts.sources_figure("BTC", "USDT", {"okx": okx.to_frame("price")}, okx, outlier_pct=bad)


def test_empty_inputs_give_a_figure_that_says_so() -> None:
    empty = pd.DataFrame(columns=["open", "high", "low", "close", "volume"], index=pd.DatetimeIndex([], tz="UTC"))
    nan_only = pd.DataFrame(
        {c: [np.nan, np.nan] for c in ["open", "high", "low", "close", "volume"]},
        index=pd.date_range("2024-01-01", periods=2, freq="D", tz="UTC"),
    )
    empty_compare = {"coins": [], "correlation": {"symbols": [], "matrix": []}, "series": {"t": [], "normalised": {}}}
    figures = [
        charts.history_figure("BTC", "USD", empty, []),
        charts.history_figure("BTC", "USD", nan_only, [anomaly(nan_only.index[0], "return")]),
        charts.candles_figure("BTC", "USD", empty),
        charts.candles_figure("BTC", "USD", nan_only),
        charts.compare_figure(empty_compare, "USD"),
        charts.compare_figure({}, "USD"),
        charts.compare_figure({"series": {"t": ["2024-01-01T00:00:00Z"], "normalised": {"BTC": [None]}}}, "USD"),
        charts.correlation_figure(empty_compare),
        charts.correlation_figure({"correlation": {"symbols": ["BTC"], "matrix": "nonsense"}}),
        charts.sources_figure("BTC", "USD", {}, pd.Series(dtype="float64"), outlier_pct=1.0),
        charts.sources_figure(
            "BTC", "USD", {"okx": pd.DataFrame({"price": []})}, pd.Series(dtype="float64"), outlier_pct=1
        ),
    ]
    for fig in figures:
        data = roundtrip(fig)
        assert no_data(data), data["layout"].get("annotations")
        assert data["layout"]["title"]["text"]


# --- standalone page -----------------------------------------------------------------------------------


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        self.script_bodies: list[str] = []
        self.style_attributes = 0
        self.styles = 0
        self.title = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action", "srcset", "poster", "data")]
        self.style_attributes += "style" in found
        self.styles += tag == "style"
        if tag == "script":
            self.scripts.append(found)
            self.script_bodies.append("")
        self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.script_bodies[-1] += data
        elif self._in == "title":
            self.title += data


PLOTLY_URL = "assets/plotly-3.min.js"
RENDERER_URL = "assets/chart.js"


def page(fig: go.Figure, title: str = "BTC in USD") -> tuple[str, PageParser]:
    text = charts.standalone_html(fig, title=title, plotly_js_url=PLOTLY_URL, renderer_js_url=RENDERER_URL)
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return text, parser


def test_standalone_page_loads_nothing_but_the_given_scripts(exchange_fixtures: Path) -> None:
    candles = okx_second_candles(exchange_fixtures)
    fig = charts.history_figure("BTC", "USDT", candles, [anomaly(candles.index[3], "return")])
    text, parsed = page(fig)

    assert text.startswith("<!DOCTYPE html>")
    assert parsed.urls == [PLOTLY_URL, RENDERER_URL]
    for marker in ("http://", "https://", "//cdn", "//"):
        assert marker not in text
    assert "mathjax" not in text.lower() and "fonts." not in text.lower()
    # Works under script-src 'self': the only script without src is a JSON data block, and no inline styles.
    assert [s.get("src") for s in parsed.scripts] == [PLOTLY_URL, RENDERER_URL, None]
    assert parsed.scripts[2]["type"] == "application/json"
    assert parsed.scripts[2]["id"] == charts.DATA_ELEMENT_ID
    assert parsed.style_attributes == 0 and parsed.styles == 0
    assert f'id="{charts.CHART_ELEMENT_ID}"' in text

    spec = json.loads(parsed.script_bodies[2])
    assert spec["figure"] == charts.figure_json(fig)
    assert spec["config"]["displaylogo"] is False
    assert spec["config"]["responsive"] is True
    go.Figure(spec["figure"])


def test_standalone_page_escapes_a_hostile_title_and_figure_text() -> None:
    hostile = '</title><script>alert("t")</script><img src=x onerror=alert(1)>'
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4], name="</script><script>alert(2)</script><!--"))
    fig.update_layout(title_text="</SCRIPT><script>alert(3)</script>&amp;")
    text, parsed = page(fig, hostile)
    assert parsed.title == hostile
    assert "<script>alert" not in text.replace("\\u003c", "").lower()
    assert "<img" not in text and "</SCRIPT>" not in text
    assert len(parsed.scripts) == 3
    # Nothing in the data block can end it or open a comment: angle brackets travel as JSON escapes.
    assert "<" not in parsed.script_bodies[2] and ">" not in parsed.script_bodies[2]
    assert parsed.urls == [PLOTLY_URL, RENDERER_URL]
    assert json.loads(parsed.script_bodies[2])["figure"] == charts.figure_json(fig)


def test_the_renderer_and_the_page_agree_on_element_ids() -> None:
    script = (charts.STATIC_DIR / charts.RENDERER_FILE).read_text()
    assert f'"{charts.CHART_ELEMENT_ID}"' in script
    assert f'"{charts.DATA_ELEMENT_ID}"' in script
    assert "Plotly.newPlot" in script
    for marker in ("http://", "https://", "eval(", "innerHTML"):
        assert marker not in script


def test_plotly_js_comes_from_the_installed_package() -> None:
    body = charts.plotly_js()
    assert body == plotly.offline.get_plotlyjs().encode()
    assert charts.plotly_js() is body
    etag = charts.plotly_js_etag()
    assert etag == '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


# --- CSV -----------------------------------------------------------------------------------------------


def read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def exact(value: float) -> Decimal:
    """What the export must write for a float: its shortest round-trip decimal."""
    return Decimal(repr(float(value)))


def test_history_csv_reads_back_to_the_same_values(exchange_fixtures: Path) -> None:
    candles = okx_daily(exchange_fixtures)
    candles.iloc[1, candles.columns.get_loc("volume")] = np.nan
    rows = read_csv(export.history_csv("BTC", "USDT", candles))
    assert rows[0] == ["t", "open", "high", "low", "close", "volume"]
    assert [r[0] for r in rows[1:]] == ["2021-09-19T00:00:00Z", "2021-09-20T00:00:00Z", "2021-09-21T00:00:00Z"]
    for row, (_, candle) in zip(rows[1:], candles.iterrows(), strict=True):
        for cell, column in zip(row[1:], ["open", "high", "low", "close", "volume"], strict=True):
            value = candle[column]
            if math.isnan(value):
                assert cell == ""
            else:
                assert Decimal(cell) == exact(value) and float(cell) == value
    # The recorded volume string survives digit for digit.
    assert rows[1][5] == "11320.85422277"
    assert rows[2][5] == ""


def test_history_csv_writes_tiny_and_huge_prices_without_exponents(exchange_fixtures: Path) -> None:
    lrc = binance_klines(exchange_fixtures)["LRCBTC"]
    assert lrc["close"].iloc[0] == 6.38e-06
    extra = pd.DataFrame(
        {"open": [0.00000123], "high": [1.5e-9], "low": [1e-12], "close": [2.5e16], "volume": [np.inf]},
        index=lrc.index + pd.Timedelta(minutes=1),
    )
    rows = read_csv(export.history_csv("LRC", "BTC", pd.concat([lrc, extra])))
    assert rows[1][1:] == ["0.00000638", "0.00000638", "0.00000638", "0.00000638", "177"]
    assert rows[2][1:] == ["0.00000123", "0.0000000015", "0.000000000001", "25000000000000000", ""]
    assert not any("e" in cell.lower() for row in rows[1:] for cell in row[1:])


def test_history_csv_takes_naive_and_zoned_times_as_utc(exchange_fixtures: Path) -> None:
    candles = okx_daily(exchange_fixtures)
    zoned = candles.tz_convert("Asia/Tokyo")
    naive = candles.tz_convert("UTC").tz_localize(None)
    expected = export.history_csv("BTC", "USDT", candles)
    assert export.history_csv("BTC", "USDT", zoned) == expected
    assert export.history_csv("BTC", "USDT", naive) == expected


def test_history_csv_is_in_time_order_with_one_row_per_time(exchange_fixtures: Path) -> None:
    candles = okx_daily(exchange_fixtures)
    rewritten = candles.iloc[[1]].assign(close=43000.5)
    # Newest first as OKX sends it, plus the middle day written twice (the later write wins).
    shuffled = pd.concat([candles.iloc[::-1], rewritten])
    rows = read_csv(export.history_csv("BTC", "USDT", shuffled))
    assert [r[0] for r in rows[1:]] == ["2021-09-19T00:00:00Z", "2021-09-20T00:00:00Z", "2021-09-21T00:00:00Z"]
    assert rows[2][4] == "43000.5"


def test_compare_csv_has_one_column_per_coin(exchange_fixtures: Path) -> None:
    result = compare_result(exchange_fixtures)
    result["series"]["normalised"]["KUCOIN"][2] = None
    # A series one short is padded, not misaligned.
    result["series"]["normalised"]["OKX"] = result["series"]["normalised"]["OKX"][:2]
    rows = read_csv(export.compare_csv(result))
    assert rows[0] == ["t", "OKX", "KUCOIN"]
    assert [r[0] for r in rows[1:]] == ["2021-09-19T00:00:00Z", "2021-09-20T00:00:00Z", "2021-09-21T00:00:00Z"]
    assert rows[1][1:] == ["100", "100"]
    normalised = result["series"]["normalised"]
    assert Decimal(rows[2][1]) == exact(normalised["OKX"][1])
    assert Decimal(rows[2][2]) == exact(normalised["KUCOIN"][1])
    assert rows[3][1:] == ["", ""]
    assert all(len(r) == 3 for r in rows)


def test_empty_exports_are_just_the_header() -> None:
    empty = pd.DataFrame(columns=["open", "high", "low", "close", "volume"], index=pd.DatetimeIndex([], tz="UTC"))
    assert read_csv(export.history_csv("BTC", "USD", empty)) == [["t", "open", "high", "low", "close", "volume"]]
    assert read_csv(export.compare_csv({})) == [["t"]]
    assert read_csv(
        export.compare_csv({"coins": [{"symbol": "BTC"}], "series": {"t": [], "normalised": {"BTC": []}}})
    ) == [["t", "BTC"]]

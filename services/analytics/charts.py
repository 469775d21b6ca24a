"""Plotly figures for the chart endpoints, and the standalone page that shows one offline.

Pure builders: they take frames and dicts the service already holds and read no database, network or
settings. Arrays go to Plotly as numpy arrays (NaN for a gap), which its validators take without checking
each element; ``figure_json`` turns them back into plain lists with null, so the JSON carries neither NaN nor
Plotly's base64 typed arrays and any client reads it. Times go out as ISO 8601 UTC strings; Plotly draws
them in UTC (it ignores the zone suffix), which the axis titles say.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.offline

from services.analytics.export import (
    candle_frame,
    compare_symbols,
    compare_times,
    compare_values,
    iso_time_array,
    numeric,
    parse_moment,
    utc_index,
)
from shared.timeparse import iso_z

NO_DATA = "no data for this range"
STATIC_DIR = Path(__file__).resolve().parent / "static"
RENDERER_FILE = "chart.js"
# Ids the page and static/chart.js agree on.
CHART_ELEMENT_ID = "coinlytics-chart"
DATA_ELEMENT_ID = "coinlytics-chart-data"

# Mid-luminance colours that keep their contrast on a white and on a near-black page, so one figure serves
# both themes; text in #767676 stays above 4.5:1 on white and on black.
NEUTRAL_TEXT = "#767676"
GRID = "rgba(128,128,128,0.22)"
AXIS_LINE = "rgba(128,128,128,0.55)"
COLORWAY = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
]
VOLUME_COLOUR = "rgba(128,128,128,0.55)"
UP = "#26a269"
DOWN = "#e01b24"
FONT_FAMILY = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'
# A gap longer than this many typical steps is drawn as a break in a line, not bridged: the chart must not
# suggest prices nobody observed.
GAP_STEPS = 3
TIME_HOVER = "%Y-%m-%d %H:%M:%S UTC"
# Correlation from -1 (blue) through 0 (neutral grey, readable in both themes) to 1 (red).
CORRELATION_SCALE = [[0.0, "#2166ac"], [0.25, "#67a9cf"], [0.5, "#a0a0a0"], [0.75, "#ef8a62"], [1.0, "#b2182b"]]


def figure_config() -> dict[str, Any]:
    """Plotly's ``config`` for embedding: no logo or cloud links, resizes with its container, no MathJax."""
    return {
        "displaylogo": False,
        "responsive": True,
        "showLink": False,
        "showEditInChartStudio": False,
        "plotlyServerURL": "",
        "typesetMath": False,
        "modeBarButtonsToRemove": ["select2d", "lasso2d"],
        "toImageButtonOptions": {"format": "png", "filename": "coinlytics-chart"},
    }


def _template() -> go.layout.Template:
    axis = {
        "gridcolor": GRID,
        "linecolor": AXIS_LINE,
        "zerolinecolor": GRID,
        "showline": True,
        "ticks": "outside",
        "tickcolor": AXIS_LINE,
        "automargin": True,
        "title": {"standoff": 10},
    }
    return go.layout.Template(
        layout={
            "font": {"family": FONT_FAMILY, "color": NEUTRAL_TEXT, "size": 13},
            "paper_bgcolor": "rgba(0,0,0,0)",
            "plot_bgcolor": "rgba(0,0,0,0)",
            "colorway": COLORWAY,
            "xaxis": axis,
            "yaxis": axis,
            "hoverlabel": {"font": {"family": FONT_FAMILY}},
            "legend": {"bgcolor": "rgba(0,0,0,0)"},
        }
    )


def _label(text: str) -> str:
    """Plotly renders a subset of HTML in labels; names that reach a label carry none of it."""
    return re.sub(r"[<>&\"']", "", str(text)).strip()


def _layout(title: str, *, hovermode: str = "x unified") -> dict[str, Any]:
    return {
        "template": _template(),
        "title": {"text": title, "x": 0.01, "xanchor": "left"},
        "margin": {"l": 64, "r": 24, "t": 72, "b": 48},
        "legend": {"orientation": "h", "x": 1.0, "xanchor": "right", "y": 1.02, "yanchor": "bottom"},
        "hovermode": hovermode,
    }


def _no_data(title: str) -> go.Figure:
    note = {"text": NO_DATA, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5, "showarrow": False}
    layout = {
        **_layout(title, hovermode="closest"),
        "xaxis": {"visible": False},
        "yaxis": {"visible": False},
        "annotations": [{**note, "font": {"size": 16}}],
    }
    return go.Figure(layout=layout)


def _array(values: Iterable[Any]) -> np.ndarray:
    """float64 values with NaN for anything missing: numpy arrays pass Plotly's validators without the
    per-element checks a list gets (seconds for a year of hourly candles)."""
    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype="object")
    array: np.ndarray = numeric(series.to_numpy()).to_numpy(dtype="float64")
    return array


def _times(index: pd.Index) -> np.ndarray:
    return iso_time_array(pd.DatetimeIndex(index))


def _number_format(values: np.ndarray) -> str:
    """A d3 format with about four significant digits at the series' scale, in fixed notation (so a coin at
    0.00000638 does not hover as 0.00 or 6.38e-6)."""
    sizes = np.abs(values[np.isfinite(values) & (values != 0)])
    if sizes.size == 0:
        return ",.2f"
    decimals = max(2, min(12, 3 - math.floor(math.log10(float(sizes.max())))))
    return f",.{decimals}~f" if decimals > 4 else f",.{decimals}f"


def _with_gap_breaks(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with an all-NaN row after each gap much longer than the usual step, so lines break there."""
    if len(frame) < 3:
        return frame
    steps = frame.index.to_series().diff().dropna()
    usual = steps.median()
    if pd.isna(usual) or usual <= pd.Timedelta(0):
        return frame
    starts = steps[steps > usual * GAP_STEPS].index
    if len(starts) == 0:
        return frame
    previous = frame.index[frame.index.get_indexer(starts) - 1]
    breaks = pd.DataFrame(np.nan, index=previous + usual, columns=frame.columns)
    return pd.concat([frame, breaks]).sort_index()


def _anomaly_points(
    anomalies: Sequence[Mapping[str, Any]], frame: pd.DataFrame, kind: str, column: str
) -> list[tuple[pd.Timestamp, float, Mapping[str, Any]]]:
    """Anomalies of ``kind`` with the candle value they sit on: the candle whose bucket holds the time.
    Entries that are malformed or fall before the first candle are left out rather than failing the chart."""
    points: list[tuple[pd.Timestamp, float, Mapping[str, Any]]] = []
    if frame.empty:
        return points
    for anomaly in anomalies:
        if not isinstance(anomaly, Mapping) or anomaly.get("kind") != kind:
            continue
        moment = parse_moment(anomaly.get("t"))
        if moment is None:
            continue
        position = int(frame.index.get_indexer([moment], method="pad")[0])
        if position < 0:
            continue
        value = frame[column].iloc[position]
        if not math.isfinite(value):
            continue
        points.append((moment, float(value), anomaly))
    return points


def _plain(value: object, digits: int = 6) -> str:
    """A number in fixed notation with ``digits`` significant digits, or "n/a"."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{min(decimals, 15)}f}".rstrip("0").rstrip(".") if decimals else f"{value:,.0f}"


def _log_return_pct(value: object) -> str:
    """A log return (what stats reports for return anomalies) as the percent change it stands for."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "n/a"
    try:
        return f"{math.expm1(value) * 100:+,.2f}%"
    except OverflowError:
        return "n/a"


def _anomaly_text(anomaly: Mapping[str, Any], what: str, unit: str) -> str:
    direction = "up" if anomaly.get("direction") == "up" else "down"
    value, baseline = anomaly.get("value"), anomaly.get("baseline")
    if what == "return":
        size, usual = _log_return_pct(value), _log_return_pct(baseline)
    else:
        size, usual = f"{_plain(value)} {unit}", f"{_plain(baseline)} {unit}"
    return f"Unusual {what} ({direction}): {size}<br>typical {usual}, score {_plain(anomaly.get('score'), 3)}"


def _anomaly_trace(
    points: list[tuple[pd.Timestamp, float, Mapping[str, Any]]],
    *,
    name: str,
    what: str,
    unit: str,
    value_line: str,
    axes: int,
) -> go.Scatter:
    """Markers for anomalies on the price (``axes`` 1) or volume (2) panel, pointing the way things moved."""
    rising = [a.get("direction") == "up" for _, _, a in points]
    return go.Scatter(
        x=[iso_z(t.to_pydatetime()) for t, _, _ in points],
        y=[y for _, y, _ in points],
        mode="markers",
        name=name,
        text=[_anomaly_text(a, what, unit) for _, _, a in points],
        marker={
            "symbol": ["triangle-up" if up else "triangle-down" for up in rising],
            "color": [UP if up else DOWN for up in rising],
            "size": 12,
            "line": {"width": 1, "color": NEUTRAL_TEXT},
        },
        hovertemplate=f"%{{text}}<br>{value_line}<extra></extra>",
        xaxis="x" if axes == 1 else f"x{axes}",
        yaxis="y" if axes == 1 else f"y{axes}",
    )


def _axis(title: str, **extra: Any) -> dict[str, Any]:
    return {"title": {"text": title}, **extra}


def _panels(title: str, *, price_title: str, volume_title: str, price_share: float) -> dict[str, Any]:
    """A layout with a price panel above a volume panel sharing one time axis (what make_subplots builds,
    written out: it is the slowest step of a small figure otherwise)."""
    gap = 0.04
    return {
        **_layout(title),
        "xaxis": {
            "anchor": "y",
            "domain": [0.0, 1.0],
            "matches": "x2",
            "showticklabels": False,
            "hoverformat": TIME_HOVER,
        },
        "yaxis": _axis(price_title, anchor="x", domain=[1.0 - price_share + gap / 2, 1.0]),
        "xaxis2": _axis("Time (UTC)", anchor="y2", domain=[0.0, 1.0], hoverformat=TIME_HOVER),
        "yaxis2": _axis(volume_title, anchor="x2", domain=[0.0, 1.0 - price_share - gap / 2], rangemode="tozero"),
    }


def _no_volume_note() -> dict[str, Any]:
    # Candles built from consolidated prices have no traded volume; say so instead of an empty panel.
    return {
        "text": "no volume for these candles",
        "xref": "x2 domain",
        "yref": "y2 domain",
        "x": 0.5,
        "y": 0.5,
        "showarrow": False,
    }


def history_figure(symbol: str, vs: str, candles: pd.DataFrame, anomalies: list[dict[str, Any]]) -> go.Figure:
    """Closing price as a line above volume bars (sharing the time axis), anomalies marked where they
    happened: unusual returns on the price line, unusual volumes on the bars."""
    symbol, vs = _label(symbol).upper(), _label(vs).upper()
    title = f"{symbol} price in {vs}"
    frame = candle_frame(candles)
    if frame["close"].notna().sum() == 0:
        return _no_data(title)
    lines = _with_gap_breaks(frame[["close"]])
    price_format = _number_format(_array(frame["close"]))
    volumes = _array(frame["volume"])
    volume_format = _number_format(volumes)
    price_line = f"Close: %{{y:{price_format}}} {vs}"
    volume_line = f"Volume: %{{y:{volume_format}}} {symbol}"

    traces: list[go.Scatter | go.Bar] = [
        go.Scatter(
            x=_times(lines.index),
            y=_array(lines["close"]),
            mode="lines",
            name="Price",
            line={"width": 1.6, "color": COLORWAY[0]},
            connectgaps=False,
            hovertemplate=f"{price_line}<extra></extra>",
            xaxis="x",
            yaxis="y",
        ),
        go.Bar(
            x=_times(frame.index),
            y=volumes,
            name="Volume",
            marker={"color": VOLUME_COLOUR, "line": {"width": 0}},
            hovertemplate=f"{volume_line}<extra></extra>",
            xaxis="x2",
            yaxis="y2",
        ),
    ]
    returns = _anomaly_points(anomalies, frame, "return", "close")
    if returns:
        trace = _anomaly_trace(returns, name="Return anomalies", what="return", unit=vs, value_line=price_line, axes=1)
        traces.append(trace)
    unusual_volumes = _anomaly_points(anomalies, frame, "volume", "volume")
    if unusual_volumes:
        traces.append(
            _anomaly_trace(
                unusual_volumes, name="Volume anomalies", what="volume", unit=symbol, value_line=volume_line, axes=2
            )
        )
    layout = _panels(title, price_title=f"Price ({vs})", volume_title=f"Volume ({symbol})", price_share=0.72)
    if not np.isfinite(volumes).any():
        layout["annotations"] = [_no_volume_note()]
    return go.Figure(data=traces, layout=layout)


def candles_figure(symbol: str, vs: str, candles: pd.DataFrame) -> go.Figure:
    """OHLC candlesticks above volume bars."""
    symbol, vs = _label(symbol).upper(), _label(vs).upper()
    title = f"{symbol}/{vs} candles"
    frame = candle_frame(candles)
    frame = frame[frame[["open", "high", "low", "close"]].notna().all(axis=1)]
    if frame.empty:
        return _no_data(title)
    times = _times(frame.index)
    price_format = _number_format(_array(frame["high"]))
    volumes = _array(frame["volume"])
    volume_format = _number_format(volumes)
    hover = "<br>".join(f"{f.title()}: %{{{f}:{price_format}}} {vs}" for f in ("open", "high", "low", "close"))
    traces: list[go.Candlestick | go.Bar] = [
        go.Candlestick(
            x=times,
            open=_array(frame["open"]),
            high=_array(frame["high"]),
            low=_array(frame["low"]),
            close=_array(frame["close"]),
            name=f"{symbol}/{vs}",
            increasing={"line": {"color": UP}, "fillcolor": UP},
            decreasing={"line": {"color": DOWN}, "fillcolor": DOWN},
            hovertemplate=f"{hover}<extra></extra>",
            xaxis="x",
            yaxis="y",
        ),
        go.Bar(
            x=times,
            y=volumes,
            name="Volume",
            # One neutral colour: the candles above show the direction, and per-bar colours would cost a
            # validated colour string per candle (or, as numbers on a colour scale, warnings in plotly.js).
            marker={"color": VOLUME_COLOUR, "line": {"width": 0}},
            hovertemplate=f"Volume: %{{y:{volume_format}}} {symbol}<extra></extra>",
            xaxis="x2",
            yaxis="y2",
        ),
    ]
    layout = _panels(title, price_title=f"Price ({vs})", volume_title=f"Volume ({symbol})", price_share=0.75)
    layout["showlegend"] = False
    # The range slider would add a third, unlabelled panel under the volume bars.
    layout["xaxis"]["rangeslider"] = {"visible": False}
    layout["xaxis2"]["rangeslider"] = {"visible": False}
    if not np.isfinite(volumes).any():
        layout["annotations"] = [_no_volume_note()]
    return go.Figure(data=traces, layout=layout)


def compare_figure(result: dict[str, Any], vs: str) -> go.Figure:
    """One line per coin: its value normalised to 100 at the start of the range, with a reference at 100."""
    vs = _label(vs).upper()
    title = f"Performance in {vs} (start = 100)"
    symbols = compare_symbols(result)
    times = compare_times(result)
    columns = {s: _array(compare_values(result, s, len(times))) for s in symbols}
    if not times or not any(np.isfinite(col).any() for col in columns.values()):
        return _no_data(title)
    axis = np.asarray(times, dtype=str)
    traces = []
    for i, (symbol, values) in enumerate(columns.items()):
        name = _label(symbol).upper()
        traces.append(
            go.Scatter(
                x=axis,
                y=values,
                customdata=values - 100.0,
                mode="lines",
                name=name,
                connectgaps=False,
                # Colours repeat after ten coins; the dash keeps the eleventh apart from the first.
                line={"width": 1.6, "dash": "solid" if i < len(COLORWAY) else "dot"},
                hovertemplate=f"{name}: %{{y:.2f}} (%{{customdata:+.2f}}% in {vs})<extra></extra>",
            )
        )
    layout = {
        **_layout(title),
        "xaxis": _axis("Time (UTC)", hoverformat=TIME_HOVER),
        "yaxis": _axis(f"Value in {vs} (start = 100)"),
        "shapes": [
            {
                "type": "line",
                "xref": "x domain",
                "x0": 0,
                "x1": 1,
                "yref": "y",
                "y0": 100,
                "y1": 100,
                "line": {"color": AXIS_LINE, "width": 1, "dash": "dash"},
            }
        ],
    }
    return go.Figure(data=traces, layout=layout)


def correlation_figure(result: dict[str, Any]) -> go.Figure:
    """A heatmap of the return correlations on a fixed -1..1 scale, each cell labelled with its value."""
    title = "Correlation of returns"
    correlation = result.get("correlation") if isinstance(result, Mapping) else None
    symbols = correlation.get("symbols") if isinstance(correlation, Mapping) else None
    matrix = correlation.get("matrix") if isinstance(correlation, Mapping) else None
    if not isinstance(symbols, list) or not symbols or not isinstance(matrix, list):
        return _no_data(title)
    names = [_label(s).upper() for s in symbols]
    size = len(names)
    rows = [list(r) if isinstance(r, list | tuple) else [] for r in matrix[:size]]
    rows += [[] for _ in range(size - len(rows))]
    z = [[None if math.isnan(v) else v for v in _array((r + [None] * size)[:size]).tolist()] for r in rows]
    if all(v is None for r in z for v in r):
        return _no_data(title)
    text = [["n/a" if v is None else f"{v:.2f}" for v in r] for r in z]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=names,
            y=names,
            text=text,
            texttemplate="%{text}",
            zmin=-1,
            zmax=1,
            zmid=0,
            colorscale=CORRELATION_SCALE,
            colorbar={"title": {"text": "correlation"}, "tickvals": [-1, -0.5, 0, 0.5, 1]},
            xgap=1,
            ygap=1,
            hovertemplate="%{y} and %{x}: %{text}<extra></extra>",
            name="correlation",
        ),
        layout={
            **_layout(title, hovermode="closest"),
            # Rows read top to bottom in the columns' order, so the diagonal runs top-left to bottom-right.
            "yaxis": {"autorange": "reversed", "scaleanchor": "x", "showgrid": False, "showline": False, "ticks": ""},
            "xaxis": {"showgrid": False, "showline": False, "ticks": ""},
        },
    )
    return fig


def _price_series(data: object) -> pd.Series:
    """A price series by UTC time, in order, without missing or non-finite prices."""
    if isinstance(data, pd.DataFrame):
        raw = data["price"] if "price" in data.columns else pd.Series(dtype="float64", index=data.index)
    elif isinstance(data, pd.Series):
        raw = data
    else:
        return pd.Series(dtype="float64", index=pd.DatetimeIndex([], tz="UTC"))
    series = pd.Series(numeric(raw.to_numpy()).to_numpy(), index=utc_index(raw.index))
    series = series[series.index.notna() & series.notna()]
    return series[~series.index.duplicated(keep="last")].sort_index()


def _deviation_pct(source: pd.Series, consolidated: pd.Series) -> pd.Series:
    """Each source price's distance from the consolidated price nearest in time, in percent (NaN where no
    consolidated price is within one usual step of the consolidated series: that point is not judged)."""
    if source.empty or consolidated.empty:
        return pd.Series(np.nan, index=source.index)
    steps = consolidated.index.to_series().diff().dropna()
    tolerance = steps.median() if not steps.empty else pd.Timedelta(0)
    left = pd.DataFrame({"t": source.index, "price": source.to_numpy()})
    right = pd.DataFrame({"t": consolidated.index, "reference": consolidated.to_numpy()})
    matched = pd.merge_asof(left, right, on="t", direction="nearest", tolerance=tolerance)
    reference = matched["reference"].where(matched["reference"] > 0)
    return pd.Series(((matched["price"] - reference) / reference * 100.0).to_numpy(), index=source.index)


def sources_figure(
    symbol: str, vs: str, sources: dict[str, pd.DataFrame], consolidated: pd.Series, *, outlier_pct: float
) -> go.Figure:
    """Each exchange's price over time around the consolidated line; a source price more than
    ``outlier_pct`` percent from the consolidated one at that time is ringed as an outlier."""
    if isinstance(outlier_pct, bool) or not isinstance(outlier_pct, int | float) or not outlier_pct >= 0:
        raise ValueError(f"outlier_pct must be a non-negative number, got {outlier_pct!r}")
    symbol, vs = _label(symbol).upper(), _label(vs).upper()
    title = f"{symbol} price in {vs} by source"
    reference = _price_series(consolidated)
    series = {_label(name): _price_series(data) for name, data in (sources or {}).items()}
    series = {name: s for name, s in series.items() if name and not s.empty}
    if reference.empty and not series:
        return _no_data(title)
    price_format = _number_format(np.concatenate([s.to_numpy() for s in [reference, *series.values()]]))

    traces: list[go.Scatter] = []
    outliers: list[pd.DataFrame] = []
    for name, prices in series.items():
        deviation = _deviation_pct(prices, reference)
        frame = _with_gap_breaks(pd.DataFrame({"price": prices, "deviation": deviation}))
        traces.append(
            go.Scatter(
                x=_times(frame.index),
                y=_array(frame["price"]),
                customdata=_array(frame["deviation"]),
                mode="lines+markers",
                name=name,
                marker={"size": 5},
                line={"width": 1.2},
                connectgaps=False,
                hovertemplate=(
                    f"{name}: %{{y:{price_format}}} {vs}<br>%{{customdata:+.3f}}% from consolidated"
                    "<br>%{x}<extra></extra>"
                ),
            )
        )
        beyond = deviation.abs() > outlier_pct
        outliers.append(pd.DataFrame({"source": name, "price": prices[beyond], "deviation": deviation[beyond]}))
    if not reference.empty:
        lines = _with_gap_breaks(pd.DataFrame({"price": reference}))
        traces.append(
            go.Scatter(
                x=_times(lines.index),
                y=_array(lines["price"]),
                mode="lines",
                name="Consolidated",
                line={"width": 3, "color": NEUTRAL_TEXT},
                connectgaps=False,
                hovertemplate=f"Consolidated: %{{y:{price_format}}} {vs}<br>%{{x}}<extra></extra>",
            )
        )
    marked = pd.concat(outliers) if outliers else pd.DataFrame()
    if not marked.empty:
        traces.append(
            go.Scatter(
                x=_times(marked.index),
                y=_array(marked["price"]),
                text=marked["source"].tolist(),
                customdata=_array(marked["deviation"]),
                mode="markers",
                name=f"Outliers (> {_plain(float(outlier_pct), 4)}%)",
                marker={"symbol": "circle-open", "size": 14, "color": DOWN, "line": {"width": 2}},
                hovertemplate=(
                    f"Outlier from %{{text}}: %{{y:{price_format}}} {vs}<br>"
                    "%{customdata:+.3f}% from consolidated<br>%{x}<extra></extra>"
                ),
            )
        )
    layout = {
        **_layout(title, hovermode="closest"),
        "xaxis": _axis("Time (UTC)", hoverformat=TIME_HOVER),
        "yaxis": _axis(f"Price ({vs})"),
    }
    return go.Figure(data=traces, layout=layout)


def _plain_arrays(value: Any) -> Any:
    """Plotly's JSON with its base64 typed arrays (``{"dtype", "bdata"}``, what numpy arrays become) turned
    back into plain lists, NaN as null: readable by any client, not only plotly.js."""
    if isinstance(value, dict):
        if isinstance(value.get("bdata"), str) and isinstance(value.get("dtype"), str):
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
            if isinstance(value.get("shape"), str):
                array = array.reshape([int(n) for n in value["shape"].split(",")])
            cells = array.astype(object)
            cells[~np.isfinite(array.astype("float64"))] = None
            return cells.tolist()
        return {k: _plain_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_arrays(v) for v in value]
    return value


def figure_json(fig: go.Figure) -> dict[str, Any]:
    """The figure as a JSON-ready dict: Plotly's own encoding, with every array a plain list and every
    missing value null (never NaN)."""
    loaded: dict[str, Any] = _plain_arrays(json.loads(fig.to_json()))
    return loaded


def _script_json(value: object) -> str:
    """JSON safe inside a <script> data block: no "<", ">" or "&" can end the block or open a comment."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def standalone_html(fig: go.Figure, *, title: str, plotly_js_url: str, renderer_js_url: str) -> str:
    """A complete page showing ``fig``, loading only the two given scripts and nothing else from anywhere.

    The figure travels as a JSON data block that ``static/chart.js`` draws, so no inline script runs and
    the page works under ``script-src 'self'``."""
    spec = {"figure": figure_json(fig), "config": figure_config()}
    safe_title = html.escape(title, quote=True)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light dark">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{safe_title}</title>\n"
        f'<script src="{html.escape(plotly_js_url, quote=True)}" defer></script>\n'
        f'<script src="{html.escape(renderer_js_url, quote=True)}" defer></script>\n'
        "</head>\n<body>\n"
        f'<div id="{CHART_ELEMENT_ID}" role="img" aria-label="{safe_title}"></div>\n'
        "<noscript>This chart needs JavaScript.</noscript>\n"
        f'<script type="application/json" id="{DATA_ELEMENT_ID}">{_script_json(spec)}</script>\n'
        "</body>\n</html>\n"
    )


@cache
def plotly_js() -> bytes:
    """plotly.min.js from the installed plotly package (read once: it is about 5 MB)."""
    return str(plotly.offline.get_plotlyjs()).encode()


@cache
def plotly_js_etag() -> str:
    """A strong ETag (quoted) for ``plotly_js()``."""
    return '"' + hashlib.sha256(plotly_js()).hexdigest()[:32] + '"'

"""The report as one self-contained HTML page: Plotly charts and the report's tables, viewable offline.

plotly.js (from the plotly package) is inlined once in the head; each chart is a div and a call into it, so
the page loads nothing from anywhere, not even from its own directory.
"""

from __future__ import annotations

from html import escape

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from services.gateway.reports.schemas import ReportOut, RouteStats
from services.gateway.reports.text import Table, summary, tables

# Charts with one bar per route stay readable up to about this many; the tables list every route.
MAX_BARS = 40
OUTCOME_COLOURS = {"delivered": "#2e7d32", "retrying": "#f9a825", "failed": "#c62828", "gone": "#6d4c41"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1rem 2rem; color: #1b1b1b; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
p.meta { margin: 0.2rem 0; color: #444; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; margin: 0.5rem 0 1rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3rem 0.5rem; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.empty { color: #555; font-style: italic; }
"""


def _route_label(route: RouteStats, several_services: bool) -> str:
    label = f"{route.method} {route.route}"
    return f"{route.service}: {label}" if several_services else label


def _figure(traces: list[go.Bar], title: str, y_title: str, *, stacked: bool = False) -> go.Figure:
    figure = go.Figure(data=traces)
    figure.update_layout(
        title=title,
        template="plotly_white",
        barmode="stack" if stacked else "group",
        height=420,
        margin={"l": 60, "r": 20, "t": 60, "b": 40},
        xaxis={"automargin": True},
        yaxis_title=y_title,
        legend={"orientation": "h", "y": 1.12},
    )
    return figure


def charts(report: ReportOut) -> dict[str, go.Figure | None]:
    """One figure per section (None where the window has nothing to draw)."""
    busiest = sorted(report.requests, key=lambda r: r.count, reverse=True)[:MAX_BARS]
    several = len({r.service for r in report.requests}) > 1
    labels = [_route_label(r, several) for r in busiest]
    latency = requests = None
    if busiest:
        latency = _figure(
            [go.Bar(name=q, x=labels, y=[getattr(r, f"{q}_ms") for r in busiest]) for q in ("p50", "p95", "p99")],
            "Latency per route", "ms",
        )  # fmt: skip
        requests = _figure(
            [
                go.Bar(name="2xx/3xx", x=labels, y=[r.count - r.status_4xx - r.status_5xx for r in busiest],
                       marker_color="#1565c0"),
                go.Bar(name="4xx", x=labels, y=[r.status_4xx for r in busiest], marker_color="#f9a825"),
                go.Bar(name="5xx", x=labels, y=[r.status_5xx for r in busiest], marker_color="#c62828"),
            ],
            "Requests and errors per route", "requests", stacked=True,
        )  # fmt: skip
    finished = [t for t in report.tasks if t.failure_rate is not None]
    task_chart = None
    if finished:
        task_chart = _figure(
            [go.Bar(name="failure rate", x=[t.task for t in finished],
                    y=[round((t.failure_rate or 0) * 100, 2) for t in finished], marker_color="#c62828")],
            "Task failure rate", "% of finished attempts",
        )  # fmt: skip
        task_chart.update_yaxes(range=[0, 100])
    uptime = None
    if report.sources:
        uptime = _figure(
            [go.Bar(name="uptime", x=[s.source for s in report.sources],
                    y=[round(s.uptime * 100, 2) for s in report.sources], marker_color="#2e7d32")],
            "Source uptime", "% of the window connected",
        )  # fmt: skip
        uptime.update_yaxes(range=[0, 100])
    deliveries = None
    if report.alerts.deliveries:
        channels = sorted({d.channel for d in report.alerts.deliveries})
        outcomes = sorted({d.outcome for d in report.alerts.deliveries})
        counts = {(d.channel, d.outcome): d.count for d in report.alerts.deliveries}
        deliveries = _figure(
            [go.Bar(name=o, x=channels, y=[counts.get((c, o), 0) for c in channels],
                    marker_color=OUTCOME_COLOURS.get(o)) for o in outcomes],
            "Alert deliveries by outcome", "deliveries", stacked=True,
        )  # fmt: skip
    return {
        "Requests": requests,
        "Latency": latency,
        "Tasks": task_chart,
        "Sources": uptime,
        "Alert deliveries": deliveries,
    }


def _table_html(table: Table) -> str:
    if not table.rows:
        return '<p class="empty">None in this window.</p>'
    head = "".join(
        f'<th scope="col"{" class=n" if i in table.numeric else ""}>{escape(h)}</th>'
        for i, h in enumerate(table.headers)
    )
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i in table.numeric else ''}>{escape(cell)}</td>" for i, cell in enumerate(row))
        + "</tr>"
        for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _chart_html(figure: go.Figure | None, div_id: str) -> str:
    if figure is None:
        return ""
    # The library is in the page's head already; each chart only adds its div and data.
    chart: str = figure.to_html(
        full_html=False, include_plotlyjs=False, div_id=div_id, config={"displaylogo": False, "responsive": True}
    )
    return f'<div class="chart" data-chart="{escape(div_id)}">{chart}</div>'


def render_html(report: ReportOut) -> str:
    figures = charts(report)
    table_list = tables(report)
    by_title = {"Requests": table_list[0], "Tasks": table_list[1], "Sources": table_list[2],
                "Alert deliveries": table_list[3], "Stream consumers": table_list[4]}  # fmt: skip
    sections = []
    for index, (title, table) in enumerate(by_title.items()):
        parts = []
        if title == "Requests":
            parts.append(_chart_html(figures["Latency"], "chart-latency"))
        parts.append(_chart_html(figures.get(title), f"chart-{index}"))
        heading = table.title if title == "Alert deliveries" else title
        section_id = f"section-{index}"
        sections.append(
            f'<section aria-labelledby="{section_id}"><h2 id="{section_id}">{escape(heading)}</h2>'
            + "".join(parts)
            + _table_html(table)
            + "</section>"
        )
    lines = summary(report)
    meta = "".join(f'<p class="meta">{escape(line)}</p>' for line in lines[1:])
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(lines[0])}</title><style>{STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
        f"<body><main><h1>{escape(lines[0])}</h1>{meta}{''.join(sections)}</main></body></html>\n"
    )

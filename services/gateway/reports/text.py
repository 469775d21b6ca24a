"""The report as tables: printed by `coinlytics report` and shown under the charts of the HTML page."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.gateway.reports.schemas import ReportOut
from shared.timeparse import iso_z


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    # Columns aligned right (numbers).
    numeric: set[int]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _moment(value: datetime) -> str:
    return iso_z(value.replace(microsecond=0))


def _n(value: int) -> str:
    return f"{value:,}"


def tables(report: ReportOut) -> list[Table]:
    requests = Table(
        "Requests",
        ["service", "method", "route", "count", "4xx", "4xx rate", "5xx", "5xx rate", "p50 ms", "p95 ms", "p99 ms"],
        [
            [r.service, r.method, r.route, _n(r.count), _n(r.status_4xx), _pct(r.error_rate_4xx), _n(r.status_5xx),
             _pct(r.error_rate_5xx), _ms(r.p50_ms), _ms(r.p95_ms), _ms(r.p99_ms)]
            for r in report.requests
        ],
        set(range(3, 11)),
    )  # fmt: skip
    tasks = Table(
        "Tasks",
        ["task", "started", "completed", "failed", "retried", "failure rate", "p50 ms", "p95 ms", "last error"],
        [
            [t.task, _n(t.started), _n(t.completed), _n(t.failed), _n(t.retried), _pct(t.failure_rate),
             _ms(t.p50_ms), _ms(t.p95_ms), t.last_error or ""]
            for t in report.tasks
        ],
        set(range(1, 8)),
    )  # fmt: skip
    sources = Table(
        "Sources",
        ["source", "kind", "uptime", "connected now", "connects", "disconnects", "errors", "last error"],
        [
            [s.source, s.kind or "-", _pct(s.uptime), "yes" if s.connected_at_end else "no", _n(s.connects),
             _n(s.disconnects), _n(s.errors), s.last_error or ""]
            for s in report.sources
        ],
        {2, 4, 5, 6},
    )  # fmt: skip
    deliveries = Table(
        f"Alert deliveries ({_n(report.alerts.fired)} alerts fired)",
        ["channel", "outcome", "count", "p95 ms"],
        [[d.channel, d.outcome, _n(d.count), _ms(d.p95_ms)] for d in report.alerts.deliveries],
        {2, 3},
    )
    streams = Table(
        "Stream consumers",
        ["stream", "reclaimed", "dead-lettered", "consumers started", "consumers stopped"],
        [
            [s.stream, _n(s.reclaimed), _n(s.dead_lettered), _n(s.consumers_started), _n(s.consumers_stopped)]
            for s in report.streams
        ],
        {1, 2, 3, 4},
    )
    return [requests, tasks, sources, deliveries, streams]


def summary(report: ReportOut) -> list[str]:
    levels = ", ".join(f"{level} {_n(count)}" for level, count in report.levels.items()) or "none"
    return [
        f"Coinlytics report {_moment(report.since)} .. {_moment(report.until)}"
        + (" (start moved up to the log's retention)" if report.window_clamped else ""),
        f"log: {report.log_path}",
        f"files read {report.files_read} (older skipped {report.files_skipped}), lines read {_n(report.lines_read)}, "
        f"unparsable {_n(report.lines_skipped)}, outside the window {_n(report.lines_outside_window)}",
        f"lines by level: {levels}",
    ]


def render_text(report: ReportOut) -> str:
    out = summary(report)
    for table in tables(report):
        out += ["", table.title]
        if not table.rows:
            out.append("  (none in this window)")
            continue
        widths = [max(len(h), *(len(row[i]) for row in table.rows)) for i, h in enumerate(table.headers)]

        def line(cells: list[str], widths: list[int] = widths, numeric: set[int] = table.numeric) -> str:
            padded = [
                c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "  " + "  ".join(padded).rstrip()

        out.append(line([h.upper() for h in table.headers]))
        out.extend(line(row) for row in table.rows)
    return "\n".join(out) + "\n"

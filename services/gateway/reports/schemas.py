"""The report's body: GET /api/v1/admin/report and `coinlytics report --format json` answer the same."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class RouteStats(BaseModel):
    service: str = Field(examples=["gateway"])
    method: str = Field(examples=["GET"])
    route: str = Field(description='the route template ("unmatched" when none matched)', examples=["/api/v1/coins"])
    count: int = Field(examples=[1520])
    status_4xx: int = Field(description="answers with a status from 400 to 499", examples=[12])
    status_5xx: int = Field(description="answers with a status of 500 or more", examples=[1])
    error_rate_4xx: float = Field(description="status_4xx / count", examples=[0.0079])
    error_rate_5xx: float = Field(description="status_5xx / count", examples=[0.0007])
    p50_ms: float | None = Field(
        description="median duration (nearest rank, within 1% of the exact value: a bounded histogram)",
        examples=[3.2],
    )
    p95_ms: float | None = Field(examples=[11.8])
    p99_ms: float | None = Field(examples=[40.5])
    max_ms: float | None = Field(examples=[212.0])


class TaskStats(BaseModel):
    task: str = Field(examples=["deliver_alert"])
    started: int = Field(examples=[40])
    completed: int = Field(examples=[37])
    failed: int = Field(description="failed attempts, retried or not", examples=[3])
    retried: int = Field(description="failed attempts that will be retried", examples=[2])
    failure_rate: float | None = Field(
        description="failed / (completed + failed); null when nothing finished", examples=[0.075]
    )
    p50_ms: float | None = Field(examples=[120.0])
    p95_ms: float | None = Field(examples=[840.0])
    last_error: str | None = Field(examples=["TimeoutError: webhook did not answer"])


class SourceStats(BaseModel):
    source: str = Field(examples=["binance"])
    kind: str | None = Field(examples=["ws"])
    uptime: float = Field(
        description="fraction of the window the source was connected (0 to 1), from its connect/disconnect "
        "events; an ingest start (service_starting) counts every source down until its next connect; a source "
        "with only errors is 0",
        examples=[0.9931],
    )
    connected_seconds: float = Field(examples=[85803.0])
    connected_at_end: bool = Field(description="connected at the window's end", examples=[True])
    connects: int = Field(examples=[3])
    disconnects: int = Field(examples=[2])
    errors: int = Field(
        description='source_error plus source_disconnected events, except disconnects with reason "stopped" '
        "(ingest closing the link on purpose)",
        examples=[5],
    )
    last_error: str | None = Field(examples=["ConnectionClosedError: no close frame received"])


class DeliveryStats(BaseModel):
    channel: str = Field(examples=["webhook"])
    outcome: str = Field(examples=["delivered"])
    count: int = Field(examples=[31])
    p95_ms: float | None = Field(examples=[180.0])


class AlertStats(BaseModel):
    fired: int = Field(examples=[33])
    by_outcome: dict[str, int] = Field(examples=[{"delivered": 31, "retrying": 2}])
    deliveries: list[DeliveryStats]


class StreamStats(BaseModel):
    stream: str = Field(examples=["ticks"])
    reclaimed: int = Field(description="entries reclaimed from stalled consumers", examples=[4])
    dead_lettered: int = Field(examples=[1])
    consumers_started: int = Field(examples=[2])
    consumers_stopped: int = Field(examples=[1])


class ReportOut(BaseModel):
    since: datetime = Field(examples=["2026-11-30T13:55:00Z"])
    until: datetime = Field(examples=["2026-12-01T13:55:00Z"])
    window_clamped: bool = Field(
        default=False,
        description="true when `since` was earlier than the system log's retention (system_log_retention_days) "
        "and the window was made to start there instead",
        examples=[False],
    )
    log_path: str = Field(
        description="the system log the report read", examples=["/var/lib/coinlytics/coinlytics_system.log"]
    )
    files: list[str] = Field(
        description="files read, oldest first (rotated ones, then the current one)",
        examples=[["coinlytics_system.20261201T020000.log", "coinlytics_system.log"]],
    )
    files_read: int = Field(examples=[2])
    files_skipped: int = Field(description="rotated files last written before the window", examples=[5])
    lines_read: int = Field(examples=[204_332])
    lines_skipped: int = Field(description="lines that are not a JSON object with a timestamp", examples=[1])
    lines_outside_window: int = Field(examples=[1_210])
    levels: dict[str, int] = Field(
        description="lines in the window per level", examples=[{"info": 203_000, "warning": 120}]
    )
    requests: list[RouteStats]
    tasks: list[TaskStats]
    sources: list[SourceStats]
    alerts: AlertStats
    streams: list[StreamStats]

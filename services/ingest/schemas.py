"""Response models of the ingest service."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from shared.source_health import SourceState


class SourceHealthOut(BaseModel):
    name: str = Field(examples=["binance"])
    kind: str | None = Field(default=None, examples=["rest"])
    state: str | None = Field(
        default=None,
        examples=["connected"],
        description="one of: " + ", ".join(SourceState),
    )
    last_message_at: datetime | None = None
    last_error: str | None = None
    last_error_kind: str | None = None
    last_error_at: datetime | None = None
    backoff_seconds: float = 0
    messages_total: int = 0
    rejected_total: int = 0
    reconnects: int = Field(default=0, description="websocket sources: times the socket came back after dropping")
    messages_per_second: float = 0
    errors: dict[str, int] = Field(default_factory=dict, examples=[{"timeout": 2}])


class SourcesOut(BaseModel):
    sources: list[SourceHealthOut]


class ErrorEntryOut(BaseModel):
    id: int
    source: str
    kind: str
    message: str
    created_at: datetime


class ErrorsOut(BaseModel):
    counts: dict[str, int] = Field(description="entries per source in the selected range")
    entries: list[ErrorEntryOut]

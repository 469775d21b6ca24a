"""Response models of the ingest service."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

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
    enabled: bool = Field(
        default=True,
        description="an administrator's switch (PATCH /api/v1/admin/sources/{name}); while false the source's "
        "loop is stopped and `state` is `disabled`. Always true for a source that cannot be switched",
    )
    switchable: bool = Field(
        default=False,
        description="whether ingest runs this source and it can be switched: false for scheduled jobs "
        "(coingecko, ecb) and for sources not started because of their configuration",
    )
    enabled_changed_at: datetime | None = Field(default=None, description="when an administrator last switched it")
    enabled_changed_by: str | None = Field(default=None, description="the administrator who last switched it")


class SourcePatch(BaseModel):
    # Strict: "false" or 0 is not a boolean here; an unknown field is refused rather than ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = Field(examples=[False], description="false stops the source's loop at once; true starts it again")


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

"""Response models of the gateway's own routes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class StatusOut(BaseModel):
    status: str = Field(examples=["ok"], description="ok, or degraded when a service or every source is down")
    services: dict[str, dict[str, Any]] = Field(examples=[{"pricing": {"status": "ready"}}])
    sources: dict[str, dict[str, Any]] = Field(
        examples=[{"binance": {"state": "connected", "last_message_at": "2026-11-25T10:00:00Z", "last_error": None}}]
    )

"""The activity-log message other services publish for the gateway, which owns ``user_activity`` and
writes it (services/gateway/consumers.py): a service records a user's change without writing the table."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.messages import utc, validation_problems
from shared.streams import PoisonMessage

# {"id", "user_id", "kind", "details", "client_address", "at"}; ``id`` makes a redelivery a no-op.
USER_ACTIVITY_STREAM = "user-activity"


class ActivityMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1, max_length=64)
    user_id: uuid.UUID
    kind: str = Field(pattern=r"^[a-z_]{1,50}$")
    details: dict[str, Any] | None = None
    client_address: str | None = Field(default=None, max_length=64)
    at: datetime

    @field_validator("at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        return utc(value)

    @classmethod
    def from_stream(cls, payload: dict[str, Any]) -> ActivityMessage:
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise PoisonMessage(f"invalid activity message: {validation_problems(exc)}") from None

    def to_stream(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

"""Request and response bodies of accounts. Inputs forbid unknown fields, so a privileged field slipped
into a body (``role``, ``is_active``, ``password_hash``) is a 422 rather than silently ignored."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from shared.validation import EMAIL_PATTERN, SYMBOL_PATTERN, SYMBOL_RE, normalise_email

PASSWORD_MIN = 10
PASSWORD_MAX = 256


Password = Field(min_length=PASSWORD_MIN, max_length=PASSWORD_MAX, examples=["correct horse battery staple"])


class _Input(BaseModel):
    # Strict: no "0" for false or 1 for "1"; what the spec's types say is what is accepted.
    model_config = ConfigDict(extra="forbid", strict=True)


class RegisterIn(_Input):
    email: str = Field(max_length=254, pattern=EMAIL_PATTERN, examples=["ada@example.com"])
    password: str = Password

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        return normalise_email(value)


class UserOut(BaseModel):
    id: uuid.UUID
    email: str = Field(examples=["ada@example.com"])
    role: Literal["user", "admin"] = Field(examples=["user"])
    vs_currency: str = Field(examples=["USD"])
    watchlist: list[str] = Field(examples=[["BTC", "ETH"]])
    is_active: bool
    created_at: datetime


class TokenOut(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - a scheme name
    expires_in: int = Field(description="seconds until the access token expires", examples=[900])


class RefreshIn(_Input):
    refresh_token: str = Field(min_length=1, max_length=4096)


class PasswordResetIn(_Input):
    email: str = Field(max_length=254, pattern=EMAIL_PATTERN, examples=["ada@example.com"])

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        return normalise_email(value)


class PasswordResetConfirmIn(_Input):
    token: str = Field(min_length=1, max_length=256, description="the token from the emailed link")
    new_password: str = Password


class AcceptedOut(BaseModel):
    status: Literal["accepted"] = "accepted"
    message: str = Field(examples=["if the address has an account, a reset link is on its way"])


class UserPatch(_Input):
    vs_currency: str | None = Field(default=None, pattern=SYMBOL_PATTERN, examples=["EUR"])
    watchlist: list[Annotated[str, Field(pattern=SYMBOL_PATTERN)]] | None = Field(
        default=None, max_length=100, examples=[["BTC", "SOL"]]
    )

    @field_validator("vs_currency")
    @classmethod
    def _currency(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().upper()
        if not SYMBOL_RE.match(value):
            raise ValueError("not a currency code")
        return value

    @field_validator("watchlist")
    @classmethod
    def _symbols(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = [v.strip().upper() for v in value]
        bad = [v for v in cleaned if not SYMBOL_RE.match(v)]
        if bad:
            raise ValueError(f"not a coin symbol: {', '.join(bad[:5])}")
        return list(dict.fromkeys(cleaned))


class ActivityOut(BaseModel):
    id: int
    kind: str = Field(examples=["login"])
    details: dict[str, Any] | None = None
    client_address: str | None = Field(default=None, examples=["203.0.113.7"])
    created_at: datetime


class ActivityListOut(BaseModel):
    items: list[ActivityOut]
    next_before_id: int | None = Field(default=None, description="pass as before_id for the next, older page")


class AdminUserPatch(_Input):
    role: Literal["user", "admin"] | None = None
    is_active: bool | None = None


class UsersOut(BaseModel):
    total: int
    users: list[UserOut]


# --- personal API keys ---------------------------------------------------------------------------

API_KEY_NAME_MAX = 100
# No control characters, and at least one character that is not a space (in the spec, so clients see it).
API_KEY_NAME_PATTERN = r"^[^\x00-\x1f\x7f]*[^\x00-\x20\x7f][^\x00-\x1f\x7f]*$"


class ApiKeyIn(_Input):
    name: str = Field(
        min_length=1,
        max_length=API_KEY_NAME_MAX,
        pattern=API_KEY_NAME_PATTERN,
        description="what the key is for (surrounding spaces are dropped)",
        examples=["portfolio script"],
    )
    expires_at: AwareDatetime | None = Field(
        default=None,
        strict=False,  # JSON carries a moment as an ISO 8601 string
        description="when the key stops working (with its time zone); none: until revoked",
        examples=["2027-06-30T00:00:00Z"],
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        # The pattern guarantees a character that is not a space, so this never leaves an empty name.
        return value.strip(" ")


class ApiKeyOut(BaseModel):
    id: uuid.UUID
    name: str = Field(examples=["portfolio script"])
    prefix: str = Field(description="the key's first characters, to recognise it by", examples=["cl_live_Xb3q"])
    created_at: datetime
    expires_at: datetime | None = None
    last_used_at: datetime | None = Field(
        default=None, description="the key's latest use, to the minute (updated at most once a minute)"
    )


class ApiKeyCreatedOut(ApiKeyOut):
    key: str = Field(
        description="the secret: shown this once and never again (only its hash is kept)",
        examples=["cl_live_Xb3qY0uS4Kp9WmR2cLzT8vHnE6aJdF1gQ5oB7iN3sUx"],
    )


class ApiKeysOut(BaseModel):
    items: list[ApiKeyOut]
    limit: int = Field(description="how many live keys an account may hold", examples=[20])

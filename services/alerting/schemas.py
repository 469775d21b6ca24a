"""Request and response bodies of the alerts API. Inputs forbid unknown fields and are strict (no "1" for
1), and every rule the schema can state is in it, so what the spec allows the API accepts, apart from the
rules no schema can state: a tracked coin and a known currency (404), a future ``expires_at``, a webhook
host that is public, a configured channel and the per-user limit (422)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.validation import EMAIL_PATTERN, SYMBOL_PATTERN, normalise_email

PRICE_CONDITIONS = ("above", "below")
PCT_CONDITIONS = ("pct_change_up", "pct_change_down")
SPREAD_CONDITIONS = ("spread_above",)
Condition = Literal["above", "below", "pct_change_up", "pct_change_down", "spread_above"]
Status = Literal["active", "paused", "expired", "fired"]
DeliveryStatus = Literal["pending", "retrying", "delivered", "failed", "disabled", "skipped"]

MAX_CHANNELS = 5
MAX_COOLDOWN_SECONDS = 604_800
DEFAULT_COOLDOWN_SECONDS = 300
MAX_WINDOW_MINUTES = 10_080
MAX_THRESHOLD = Decimal("1e15")
# A positive decimal as a string (clients that keep every digit send strings): what `threshold` accepts
# besides a JSON number.
POSITIVE_DECIMAL_PATTERN = r"^([1-9][0-9]{0,14}(\.[0-9]{1,18})?|0?\.[0-9]{0,17}[1-9][0-9]{0,17})$"
_PORT = r"(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
_IPV6 = r"\[[0-9A-Fa-f]{0,4}(:[0-9A-Fa-f]{0,4}){2,7}(:[0-9]{1,3}(\.[0-9]{1,3}){3})?\]"
# No control characters or spaces anywhere (nothing a store or an HTTP client can't carry).
_REST = r"([/?#][^\x00-\x20\x7f]*)?"
WEBHOOK_URL_PATTERN = rf"^[Hh][Tt][Tt][Pp][Ss]?://([^\x00-\x20\x7f/?#@\[\]:\\]+|{_IPV6}){_PORT}{_REST}$"
E164_PATTERN = r"^\+[1-9][0-9]{6,14}$"

THRESHOLD_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1e15},
        {"type": "string", "pattern": POSITIVE_DECIMAL_PATTERN},
    ],
    "description": "a positive number: the price for above/below, percent for pct_change_* and spread_above",
    "examples": [100000],
}
EXPIRES_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string", "format": "date-time"}, {"type": "integer"}, {"type": "null"}],
    "description": "when the alert stops (ISO 8601 or Unix seconds, in the future); null: never",
    "examples": ["2027-01-01T00:00:00Z"],
}


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class WebhookChannel(_Input):
    type: Literal["webhook"]
    url: str = Field(
        max_length=2048,
        pattern=WEBHOOK_URL_PATTERN,
        description="http(s) URL on a public address; signed with Standard Webhooks",
        examples=["https://example.com/hooks/coinlytics"],
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            host, _ = parts.hostname, parts.port
        except ValueError as exc:
            raise ValueError(f"not a valid URL: {exc}") from None
        if not host:
            raise ValueError("the URL has no host")
        return value


class EmailChannel(_Input):
    type: Literal["email"]
    to: str = Field(max_length=254, pattern=EMAIL_PATTERN, examples=["ada@example.com"])

    @field_validator("to")
    @classmethod
    def _to(cls, value: str) -> str:
        return normalise_email(value)


class SmsChannel(_Input):
    type: Literal["sms"]
    to: str = Field(pattern=E164_PATTERN, description="E.164 phone number", examples=["+14155550100"])


Channel = Annotated[WebhookChannel | EmailChannel | SmsChannel, Field(discriminator="type")]
Channels = Annotated[
    list[Channel],
    Field(
        min_length=1,
        max_length=MAX_CHANNELS,
        json_schema_extra={"uniqueItems": True},
        examples=[[{"type": "webhook", "url": "https://example.com/hooks/coinlytics"}]],
    ),
]
Threshold = Annotated[Decimal, Field(strict=False, json_schema_extra=THRESHOLD_SCHEMA)]
Window = Annotated[int, Field(ge=1, le=MAX_WINDOW_MINUTES, description="the pct_change window, minutes", examples=[60])]
Cooldown = Annotated[
    int, Field(ge=0, le=MAX_COOLDOWN_SECONDS, description="quiet time after a trigger, seconds", examples=[300])
]
Expires = Annotated[datetime | None, Field(strict=False, json_schema_extra=EXPIRES_SCHEMA)]


def check_threshold(value: Any) -> Any:
    """A JSON number or a decimal string, positive and at most 1e15; never NaN, infinity or a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError("threshold must be a number")
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        raise ValueError("threshold must be a number") from None
    if not number.is_finite() or number <= 0:
        raise ValueError("threshold must be greater than 0")
    if number > MAX_THRESHOLD:
        raise ValueError("threshold must be at most 1e15")
    return number


def check_channels(channels: list[Any]) -> list[Any]:
    dumped = [c.model_dump() for c in channels]
    if len({tuple(sorted(d.items())) for d in dumped}) != len(dumped):
        raise ValueError("each channel may appear only once")
    return channels


class _AlertIn(_Input):
    symbol: str = Field(pattern=SYMBOL_PATTERN, description="a tracked coin", examples=["BTC"])
    vs: str = Field(pattern=SYMBOL_PATTERN, description="a published currency", examples=["USD"])
    threshold: Threshold
    channels: Channels
    cooldown_seconds: Cooldown = DEFAULT_COOLDOWN_SECONDS
    expires_at: Expires = None
    one_shot: bool = Field(default=False, description="fire at most once")

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> Any:
        return check_threshold(value)

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[Any]) -> list[Any]:
        return check_channels(value)

    @field_validator("symbol", "vs")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()


class _NoWindow(_AlertIn):
    @model_validator(mode="before")
    @classmethod
    def _no_window(cls, data: Any) -> Any:
        if isinstance(data, dict) and "window_minutes" in data:
            raise ValueError("window_minutes applies only to pct_change_up and pct_change_down")
        return data


class PriceAlertIn(_NoWindow):
    condition: Literal["above", "below"] = Field(description="the consolidated price crosses the threshold")


class PctChangeAlertIn(_AlertIn):
    condition: Literal["pct_change_up", "pct_change_down"] = Field(
        description="the change over window_minutes reaches threshold percent"
    )
    window_minutes: Window


class SpreadAlertIn(_NoWindow):
    condition: Literal["spread_above"] = Field(
        description="the spread between the highest and lowest used source exceeds threshold percent"
    )


AlertIn = Annotated[PriceAlertIn | PctChangeAlertIn | SpreadAlertIn, Field(discriminator="condition")]


class AlertPatch(_Input):
    """Any subset of an alert's settings; the result must be a valid alert. ``channels`` replaces the list
    (a webhook URL already on the alert keeps its secret; a new one gets a new secret, shown in this
    response only)."""

    symbol: str | None = Field(default=None, pattern=SYMBOL_PATTERN, examples=["ETH"])
    vs: str | None = Field(default=None, pattern=SYMBOL_PATTERN, examples=["EUR"])
    condition: Condition | None = None
    threshold: Threshold | None = None
    window_minutes: Window | None = None
    channels: Channels | None = None
    cooldown_seconds: Cooldown | None = None
    expires_at: Expires = None
    one_shot: bool | None = None
    paused: bool | None = Field(default=None, description="same as POST .../pause and .../resume")

    @field_validator("threshold", mode="before")
    @classmethod
    def _threshold(cls, value: Any) -> Any:
        return None if value is None else check_threshold(value)

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[Any] | None) -> list[Any] | None:
        return None if value is None else check_channels(value)

    @field_validator("symbol", "vs")
    @classmethod
    def _upper(cls, value: str | None) -> str | None:
        return None if value is None else value.upper()


class ChannelOut(BaseModel):
    type: Literal["webhook", "email", "sms"]
    url: str | None = Field(default=None, examples=["https://example.com/hooks/coinlytics"])
    to: str | None = None
    disabled: bool = Field(
        default=False, description="no longer sent to: a webhook answered 410 Gone, or the recipient unsubscribed"
    )
    disabled_reason: str | None = None
    secret: str | None = Field(
        default=None,
        description="webhooks: the Standard Webhooks signing secret, only in the response that created it",
        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
    )


class AlertOut(BaseModel):
    id: uuid.UUID
    symbol: str = Field(examples=["BTC"])
    vs: str = Field(examples=["USD"])
    condition: Condition
    threshold: Decimal = Field(examples=[100000])
    window_minutes: int | None = None
    channels: list[ChannelOut]
    cooldown_seconds: int = Field(examples=[300])
    one_shot: bool
    expires_at: datetime | None = None
    paused: bool
    status: Status = Field(
        description="active; paused; expired (past expires_at); fired (a one-shot alert that fired: resume re-arms it)"
    )
    created_at: datetime
    updated_at: datetime
    last_fired_at: datetime | None = None


class AlertListOut(BaseModel):
    items: list[AlertOut]
    total: int
    page: int
    per_page: int


class DeliveryOut(BaseModel):
    channel: int = Field(description="position of the channel in the alert's channels")
    type: str = Field(examples=["webhook"])
    status: DeliveryStatus = Field(
        examples=["delivered"],
        description=(
            "pending (not sent yet); retrying (an attempt failed, the next is at next_attempt_at); delivered; "
            "failed (refused for good, or every retry over about a day failed); disabled (the webhook answered "
            "410 Gone: the channel is switched off); skipped (the channel was disabled or changed)"
        ),
    )
    attempts: int
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None


class AlertEventOut(BaseModel):
    id: uuid.UUID = Field(description="the event id: the webhook-id header and the body's id")
    created_at: datetime
    condition: str | None = Field(default=None, examples=["above"])
    threshold: Decimal | None = None
    value: Decimal | None = Field(default=None, description="what crossed: the price, percent change or spread")
    price: Decimal
    price_at: datetime | None = None
    deliveries: list[DeliveryOut]


class UnsubscribeOut(BaseModel):
    alert_id: uuid.UUID
    channel: int
    to: str | None = None
    unsubscribed: bool


class AlertEventsOut(BaseModel):
    items: list[AlertEventOut]


CHANNEL_MODELS = {"email": "EmailChannel", "sms": "SmsChannel", "webhook": "WebhookChannel"}


def without_channels(spec: dict[str, Any], types: set[str]) -> dict[str, Any]:
    """``spec`` (an OpenAPI document, changed in place) without the channel ``types`` this deployment has
    not configured, so the published schema offers exactly the channels that are accepted."""
    gone = {f"#/components/schemas/{CHANNEL_MODELS[t]}" for t in types}

    def prune(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("oneOf"), list):
                node["oneOf"] = [item for item in node["oneOf"] if item.get("$ref") not in gone]
                mapping = node.get("discriminator", {}).get("mapping", {})
                for key in [k for k, ref in mapping.items() if ref in gone]:
                    del mapping[key]
            for value in node.values():
                prune(value)
        elif isinstance(node, list):
            for value in node:
                prune(value)

    prune(spec)
    for name in (CHANNEL_MODELS[t] for t in types):
        spec.get("components", {}).get("schemas", {}).pop(name, None)
    return spec

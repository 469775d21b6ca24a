"""Typed configuration for every service.

Settings are read when ``Settings()`` is constructed (in a service's lifespan or CLI entry point),
never at import time, so tests and the launcher can shape the environment first.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_COINS = "BTC,ETH,SOL,XRP,ADA,DOGE,LTC,DOT,LINK,AVAX"
DEFAULT_VS = "USD,EUR,GBP,JPY"
DEFAULT_SOURCES = "binance,kraken,coinbase,bitstamp,okx,kucoin,gemini,coingecko,ecb"
DEV_JWT_SECRET = "dev-only-insecure-jwt-secret-change-me"  # noqa: S105 - the refused placeholder
DEV_HMAC_KEY = "dev-only-insecure-hmac-key-change-me"
# Known placeholders people paste from examples; refused outside development like an empty secret.
PLACEHOLDER_SECRETS = frozenset(
    {DEV_JWT_SECRET, DEV_HMAC_KEY, "secret", "changeme", "change-me", "password", "jwt-secret", "test"}
)
MIN_SECRET_LENGTH = 32

SERVICE_PORTS = {
    "gateway": 8000,
    "ingest": 8001,
    "pricing": 8002,
    "conversion": 8003,
    "analytics": 8004,
    "alerting": 8005,
}


class ConfigurationError(Exception):
    """Raised when configuration is unusable; the message says what to change."""


def _is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve anywhere


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="COINLYTICS_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    env: Literal["development", "test", "production"] = "production"
    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = Path("./.coinlytics")

    coins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: DEFAULT_COINS.split(","))
    vs_currencies: Annotated[list[str], NoDecode] = Field(default_factory=lambda: DEFAULT_VS.split(","))
    sources: Annotated[list[str], NoDecode] = Field(default_factory=lambda: DEFAULT_SOURCES.split(","))
    source_urls: dict[str, str] = Field(default_factory=dict)

    max_clock_skew_seconds: float = Field(default=60, ge=0)
    jwt_secret: SecretStr | None = None
    hmac_key: SecretStr | None = None
    smtp_url: str | None = None
    # Twilio's Messages resource, credentials in the URL:
    # https://<account sid>:<auth token>@api.twilio.com/2010-04-01/Accounts/<account sid>/Messages.json
    sms_url: str | None = None
    # The sender (a number or alphanumeric id) SMS alerts come from.
    sms_from: str = "Coinlytics"
    webhook_allow_private: bool = False
    # Alert rules one user may keep (COINLYTICS_ALERTS_MAX_PER_USER); creating one more is a 422.
    alerts_max_per_user: int = Field(default=100, ge=1)
    # Analytics: most points per coin one request may cover (more is a 422 naming a coarser interval), and how
    # long a computed result may be served from the cache (it is dropped sooner when a new candle lands).
    analytics_max_points: int = Field(default=10_000, ge=10, le=100_000)
    analytics_cache_seconds: float = Field(default=300, ge=0)
    # Seconds before each retry of a failed alert delivery (Standard Webhooks' schedule: 5 s, 5 min, 30 min,
    # 2 h, 5 h, 10 h, 10 h: about 27 hours in all), each jittered by up to a fifth; then it is "failed".
    alert_retry_schedule: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    )

    # Internals with sensible defaults; documented in the README.
    redis_namespace: str = Field(default="coinlytics", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    host: str = "127.0.0.1"
    gateway_port: int = SERVICE_PORTS["gateway"]
    ingest_url: str = f"http://127.0.0.1:{SERVICE_PORTS['ingest']}"
    pricing_url: str = f"http://127.0.0.1:{SERVICE_PORTS['pricing']}"
    conversion_url: str = f"http://127.0.0.1:{SERVICE_PORTS['conversion']}"
    analytics_url: str = f"http://127.0.0.1:{SERVICE_PORTS['analytics']}"
    alerting_url: str = f"http://127.0.0.1:{SERVICE_PORTS['alerting']}"
    upstream_timeout_seconds: float = Field(default=10.0, gt=0)
    poll_interval_seconds: float = Field(default=5.0, gt=0)
    source_timeout_seconds: float = Field(default=10.0, gt=0)
    # How often ingest re-reads the tracked coins (the `coins` table) to follow admin changes.
    coins_refresh_seconds: float = Field(default=10.0, gt=0)
    stream_maxlen: int = Field(default=100_000, ge=100)
    stream_max_deliveries: int = Field(default=5, ge=1)
    stream_claim_idle_ms: int = Field(default=30_000, ge=100)
    stream_batch_size: int = Field(default=500, ge=1)
    # A consumer that completes no read, or whose oldest pending entry does not move, for this long is
    # stalled: /readyz answers 503. Longer than a poison entry's way to the dead-letter stream.
    stream_stall_seconds: float = Field(default=300.0, gt=0)
    min_fresh_sources: int = Field(default=2, ge=1)
    source_max_age_ws_seconds: float = Field(default=30, gt=0)
    source_max_age_rest_seconds: float = Field(default=120, gt=0)
    consolidation_refresh_seconds: float = Field(default=5, gt=0)
    # Sharding (docs/scaling.md): how many pricing and alerting replicas split the coins between them, and
    # which one this process is: an index, or "auto" for the ordinal a StatefulSet pod's hostname ends with.
    pricing_shards: int = Field(default=1, ge=1, le=1024)
    alerting_shards: int = Field(default=1, ge=1, le=1024)
    shard: str = "0"
    sim_interval_seconds: float = Field(default=1.0, gt=0)
    sim_seed: int | None = None
    # History: raw ticks and 1-minute candles are deleted after these ages; hourly and daily candles stay.
    retention_ticks_hours: float = Field(default=48, gt=0)
    retention_candles_1m_days: float = Field(default=90, gt=0)
    # Append-only tables, deleted past these ages by the same job: rate snapshots (past conversions older
    # than this fall back to candles and ECB days), the error log, and account activity.
    retention_rate_snapshots_days: float = Field(default=30, gt=0)
    retention_error_log_days: float = Field(default=30, gt=0)
    retention_user_activity_days: float = Field(default=365, gt=0)
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    # The system log (docs/operations.md): one JSON-lines file every service of this data dir appends to,
    # `<data_dir>/coinlytics_system.log` unless a path is given; renamed aside when it passes the size, and
    # rotated files older than the retention are deleted by the gateway's hourly job.
    system_log_path: Path | None = None
    system_log_max_mb: float = Field(default=50, gt=0)
    system_log_retention_days: float = Field(default=7, gt=0)
    # Live push (the gateway's /api/v1/ws)
    # A heartbeat frame this often; an authenticated socket's token is re-checked (expiry, revocation) at each.
    live_heartbeat_seconds: float = Field(default=15.0, gt=0)
    # Symbols one socket may subscribe to at once.
    live_max_symbols: int = Field(default=50, ge=1, le=1000)
    # Open sockets per gateway process; the next one is refused with close code 1013.
    live_max_sockets: int = Field(default=10_000, ge=1)
    # Alert and reply frames one socket may have waiting (prices coalesce instead); one more disconnects it.
    live_queue_frames: int = Field(default=100, ge=1)
    # One drain of a socket's queue that takes longer than this disconnects the client as too slow.
    live_send_timeout_seconds: float = Field(default=10.0, gt=0)
    # Largest client message read; a larger one is answered with an error frame.
    live_max_message_bytes: int = Field(default=4096, ge=256)

    # Accounts and gateway security (docs/security.md explains each).
    public_url: str = Field(default=f"http://127.0.0.1:{SERVICE_PORTS['gateway']}", pattern=r"^https?://[^/?#]+$")
    smtp_from: str = "Coinlytics <no-reply@localhost>"
    jwt_issuer: str = "coinlytics"
    jwt_audience: str = "coinlytics-api"
    access_token_minutes: int = Field(default=15, ge=1, le=60)
    refresh_token_days: int = Field(default=14, ge=1, le=90)
    token_verifier: Literal["local", "oidc"] = "local"  # noqa: S105 - a mode name
    oidc_issuer: str | None = None
    oidc_jwks_url: str | None = None
    oidc_audience: str | None = None
    oidc_algorithms: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["RS256"])
    oidc_admin_role: str = "admin"
    # OWASP's floor for Argon2id is m=19 MiB, t=2, p=1; lower values are refused.
    argon2_memory_kib: int = Field(default=19_456, ge=19_456)
    argon2_time_cost: int = Field(default=2, ge=2)
    argon2_parallelism: int = Field(default=1, ge=1)
    password_reset_minutes: int = Field(default=30, ge=5, le=60)
    login_max_failures: int = Field(default=5, ge=1)
    login_failure_window_seconds: int = Field(default=900, ge=1)
    login_max_attempts_per_ip: int = Field(default=50, ge=1)
    login_ip_window_seconds: int = Field(default=300, ge=1)
    rate_limit_anonymous: int = Field(default=60, ge=1)
    rate_limit_user: int = Field(default=600, ge=1)
    rate_limit_window_seconds: int = Field(default=60, ge=1)
    # Personal API keys (docs/security.md): how many live (unrevoked, unexpired) keys one account may hold.
    api_keys_max_per_user: int = Field(default=20, ge=1, le=1000)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    https_only: bool = False
    hsts_seconds: int = Field(default=31_536_000, ge=0)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    internal_auth_required: bool = True
    internal_auth_max_skew_seconds: int = Field(default=60, ge=1)
    # Peers (IPs or CIDRs) whose X-Forwarded-For/-Proto the gateway believes; empty: nobody's.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # At most one password-reset mail per account in this many seconds (0: no limit).
    password_reset_mail_interval_seconds: int = Field(default=300, ge=0)

    @field_validator("coins", "vs_currencies", mode="before")
    @classmethod
    def _upper_csv(cls, value: object) -> object:
        value = _split_csv(value)
        if isinstance(value, list):
            return [str(v).strip().upper() for v in value]
        return value

    @field_validator("cors_origins", "oidc_algorithms", "alert_retry_schedule", mode="before")
    @classmethod
    def _plain_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("alert_retry_schedule")
    @classmethod
    def _delays_are_positive(cls, value: list[float]) -> list[float]:
        if not value or any(not (0 < delay <= 7 * 86400) for delay in value):
            raise ValueError("give one or more retry delays in seconds, each above 0 and at most 604800 (7 days)")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry!r} is not an IP address or CIDR range (e.g. 10.0.0.0/8); '*' is not accepted: "
                    "list the proxies in front of the gateway"
                ) from None
        return value

    @field_validator("shard", mode="before")
    @classmethod
    def _shard_is_index_or_auto(cls, value: object) -> object:
        text = str(value).strip().lower()
        if text != "auto" and not (text.isdigit() and text.isascii() and len(text) <= 4):
            raise ValueError(
                f"{value!r} is not a shard: give this replica's index (0, 1, ...) or auto (the ordinal at the "
                "end of the hostname, as a StatefulSet pod has)"
            )
        return text if text == "auto" else str(int(text))

    @field_validator("system_log_path", mode="before")
    @classmethod
    def _empty_path_is_default(cls, value: object) -> object:
        # COINLYTICS_SYSTEM_LOG_PATH= (empty) means the default, not Path("") (the working directory).
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("system_log_path")
    @classmethod
    def _log_path_is_a_file(cls, value: Path | None) -> Path | None:
        if value is not None and value.is_dir():
            example = value / "coinlytics_system.log"
            raise ValueError(f"{value} is a directory: give the log file's path, e.g. {example}")
        return value

    @field_validator("sources", mode="before")
    @classmethod
    def _lower_csv(cls, value: object) -> object:
        value = _split_csv(value)
        if isinstance(value, list):
            return [str(v).strip().lower() for v in value]
        return value

    @field_validator("coins", "vs_currencies")
    @classmethod
    def _symbols_are_tickers(cls, value: list[str]) -> list[str]:
        for symbol in value:
            if not (1 <= len(symbol) <= 15 and symbol.isalnum()):
                raise ValueError(f"{symbol!r} is not a ticker symbol (letters and digits, 1-15 characters)")
        if not value:
            raise ValueError("at least one entry is required")
        return list(dict.fromkeys(value))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _SourceUrlSettings(settings_cls, dotenv_settings),
            env_settings,
            dotenv_settings,
            file_secret_settings,
        )

    @model_validator(mode="after")
    def _check_internal_auth(self) -> Settings:
        if not self.internal_auth_required and self.env != "test":
            raise ValueError(
                f"COINLYTICS_INTERNAL_AUTH_REQUIRED=false is only accepted with COINLYTICS_ENV=test (it is "
                f"{self.env}): without it anyone who reaches a service directly skips the gateway's checks"
            )
        return self

    @model_validator(mode="after")
    def _check_secrets(self) -> Settings:
        if self.env == "development":
            if self.jwt_secret is None:
                self.jwt_secret = SecretStr(DEV_JWT_SECRET)
            if self.hmac_key is None:
                self.hmac_key = SecretStr(DEV_HMAC_KEY)
            if not _is_loopback(self.host):
                placeholders = [
                    f"COINLYTICS_{name.upper()}"
                    for name in ("jwt_secret", "hmac_key")
                    if getattr(self, name).get_secret_value().lower() in PLACEHOLDER_SECRETS
                ]
                if placeholders:
                    raise ValueError(
                        f"COINLYTICS_HOST={self.host} is reachable from other machines, so the development "
                        f"placeholder {' and '.join(placeholders)} would let anyone forge tokens: set strong "
                        "secrets or bind to 127.0.0.1"
                    )
            return self
        for name in ("jwt_secret", "hmac_key"):
            secret: SecretStr | None = getattr(self, name)
            env_name = f"COINLYTICS_{name.upper()}"
            if secret is None:
                raise ValueError(
                    f"{env_name} is not set. Outside development (COINLYTICS_ENV={self.env}) a strong secret "
                    f"is required: generate one with `python -c 'import secrets; print(secrets.token_urlsafe(48))'`."
                )
            raw = secret.get_secret_value()
            if raw.lower() in PLACEHOLDER_SECRETS or len(raw) < MIN_SECRET_LENGTH or len(set(raw)) < 8:
                raise ValueError(
                    f"{env_name} is too weak: use at least {MIN_SECRET_LENGTH} random characters "
                    "(a known placeholder or a repetitive value is refused outside development)."
                )
        return self

    def source_url(self, source: str, kind: Literal["rest", "ws"]) -> str | None:
        return self.source_urls.get(f"{source.lower()}_{kind}_url")

    def shard_index(self, shards: int, *, hostname: str | None = None) -> int:
        """This replica's shard among ``shards`` (``pricing_shards`` or ``alerting_shards``), from
        COINLYTICS_SHARD; "auto" reads the ordinal at the end of the hostname (``pricing-2`` is shard 2)."""
        import socket

        from shared.sharding import hostname_ordinal

        if shards < 1:
            raise ConfigurationError(f"the shard count must be at least 1, not {shards}")
        if self.shard == "auto":
            name = hostname if hostname is not None else socket.gethostname()
            index = hostname_ordinal(name)
            if index is None:
                raise ConfigurationError(
                    f"COINLYTICS_SHARD=auto takes the shard from the hostname's trailing ordinal (a StatefulSet "
                    f"pod such as pricing-1), but the hostname {name!r} has none: set COINLYTICS_SHARD to a "
                    f"number from 0 to {shards - 1}"
                )
            origin = f"the hostname {name!r}"
        else:
            index = int(self.shard)
            origin = f"COINLYTICS_SHARD={self.shard}"
        if index >= shards:
            raise ConfigurationError(
                f"{origin} names shard {index}, but there are only {shards} (0 to {shards - 1}): give an index "
                "below the shard count, or raise the count (docs/scaling.md: drain first)"
            )
        return index

    def system_log_file(self) -> Path:
        """Where the system log is written (and read by the report): the configured path or the data dir's."""
        return self.system_log_path or self.data_dir / "coinlytics_system.log"

    def service_url(self, service: str) -> str:
        url: str = getattr(self, f"{service}_url")
        return url.rstrip("/")

    def jwt_secret_value(self) -> str:
        assert self.jwt_secret is not None  # guaranteed by _check_secrets
        return self.jwt_secret.get_secret_value()

    def hmac_key_bytes(self) -> bytes:
        assert self.hmac_key is not None
        return self.hmac_key.get_secret_value().encode()

    def purpose_key(self, purpose: str) -> bytes:
        """A key for one use of ``COINLYTICS_HMAC_KEY`` (``cache``, ``internal``, ...): a value signed for one
        purpose never verifies for another."""
        from shared.hmac_sign import derive_key

        return derive_key(self.hmac_key_bytes(), purpose)

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigurationError(
                "COINLYTICS_DATABASE_URL is not set. `make run` starts an embedded PostgreSQL and sets it; "
                "to run a service on its own, point it at a PostgreSQL server."
            )
        return self.database_url

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise ConfigurationError(
                "COINLYTICS_REDIS_URL is not set. `make run` starts an embedded Redis and sets it; "
                "to run a service on its own, point it at a Redis server."
            )
        return self.redis_url

    def key(self, *parts: str) -> str:
        """A Redis key or stream name inside this deployment's namespace."""
        return ":".join((self.redis_namespace, *parts))


class _SourceUrlSettings(PydanticBaseSettingsSource):
    """COINLYTICS_SOURCE_<NAME>_REST_URL / _WS_URL, from the .env file and the environment (which wins, as
    for every other setting). The names are open-ended, so they are gathered rather than declared one by one;
    explicit ``source_urls=`` values still win per source."""

    def __init__(self, settings_cls: type[BaseSettings], dotenv: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.dotenv = dotenv

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, str] = {}
        dotenv_vars: Mapping[str, str | None] = getattr(self.dotenv, "env_vars", {})
        for variables in (dotenv_vars, os.environ):
            for key, value in variables.items():
                upper = key.upper()
                is_url = upper.endswith("_REST_URL") or upper.endswith("_WS_URL")
                if value is not None and upper.startswith("COINLYTICS_SOURCE_") and is_url:
                    found[upper.removeprefix("COINLYTICS_SOURCE_").lower()] = value
        return {"source_urls": found} if found else {}


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning validation failures into one readable ConfigurationError."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "settings"
            name = f"COINLYTICS_{loc.upper()}" if loc != "settings" else "configuration"
            lines.append(f"  {name}: {err['msg'].removeprefix('Value error, ')}")
        raise ConfigurationError("invalid configuration:\n" + "\n".join(lines)) from None

"""The oldest PostgreSQL and Redis servers Coinlytics supports, and the startup check that refuses older ones.

Redis 6.2 is the first with ``XPENDING ... IDLE``, which the stream consumer's reclaim relies on; the suite
runs on Redis 6.2, 7.x and Valkey 9 (which reports itself as ``redis_version`` 7.2). PostgreSQL 15 is the
oldest the suite runs on (15 on CI's machine, 16 embedded)."""

from __future__ import annotations

import re

from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

MIN_POSTGRES = (15, 0)
MIN_REDIS = (6, 2)


class UnsupportedServerError(RuntimeError):
    """A server is older than the minimum: the message names both versions."""


def parse_version(raw: str) -> tuple[int, int]:
    match = re.match(r"\s*(\d+)(?:\.(\d+))?", raw)
    if match is None:
        raise ValueError(f"unrecognised version {raw!r}")
    return int(match.group(1)), int(match.group(2) or 0)


def _dotted(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


async def postgres_version(engine: AsyncEngine) -> str:
    async with engine.connect() as conn:
        return str((await conn.execute(text("SHOW server_version"))).scalar_one())


async def redis_version(redis: Redis) -> str:
    info = await redis.info("server")
    return str(info.get("redis_version", "0"))


def check_versions(
    postgres: str | None,
    redis: str | None,
    *,
    min_postgres: tuple[int, int] = MIN_POSTGRES,
    min_redis: tuple[int, int] = MIN_REDIS,
) -> None:
    """Raises UnsupportedServerError for a server older than its minimum (``None``: not checked)."""
    problems = []
    if postgres is not None and parse_version(postgres) < min_postgres:
        problems.append(f"PostgreSQL {postgres} is older than the minimum supported {_dotted(min_postgres)}")
    if redis is not None and parse_version(redis) < min_redis:
        problems.append(f"Redis {redis} is older than the minimum supported {_dotted(min_redis)}")
    if problems:
        raise UnsupportedServerError("; ".join(problems) + ": upgrade the server (see README, Requirements)")


async def ensure_supported_servers(
    engine: AsyncEngine,
    redis: Redis,
    *,
    min_postgres: tuple[int, int] = MIN_POSTGRES,
    min_redis: tuple[int, int] = MIN_REDIS,
) -> dict[str, str]:
    """Both servers' versions, after refusing unsupported ones."""
    versions = {"postgres": await postgres_version(engine), "redis": await redis_version(redis)}
    check_versions(versions["postgres"], versions["redis"], min_postgres=min_postgres, min_redis=min_redis)
    return versions

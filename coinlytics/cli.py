"""The ``coinlytics`` command: run the whole platform, apply migrations, backfill history.

``coinlytics run`` is what ``make run`` calls: it finds or starts PostgreSQL and Redis, applies the
migrations, and supervises one process per service until Ctrl-C, then stops everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from shared.settings import ConfigurationError, Settings, load_settings

SERVICES = ("ingest", "pricing", "conversion", "analytics", "alerting", "gateway")
SECRETS_FILE = "secrets.env"


def _say(message: str) -> None:
    sys.stdout.write(f"coinlytics | {message}\n")
    sys.stdout.flush()


def _fail(message: str) -> None:
    sys.stderr.write(f"coinlytics | error: {message}\n")
    raise SystemExit(2)


def ensure_secrets(data_dir: Path) -> dict[str, str]:
    """Secrets for a local run when none are configured: generated once, kept (mode 0600) in the data dir."""
    path = data_dir / SECRETS_FILE
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip()
    changed = False
    for name in ("COINLYTICS_JWT_SECRET", "COINLYTICS_HMAC_KEY"):
        if not values.get(name):
            values[name] = secrets.token_urlsafe(48)
            changed = True
    if changed:
        data_dir.mkdir(parents=True, exist_ok=True)
        # Created with mode 0600 (never readable by others, not even for a moment), replaced atomically.
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("".join(f"{k}={v}\n" for k, v in values.items()))
        staging.chmod(0o600)  # an existing staging file keeps its mode through O_CREAT
        staging.replace(path)
    return values


@contextlib.contextmanager
def infrastructure(settings: Settings, data_dir: Path) -> Iterator[dict[str, str]]:
    """Yields the environment that points services at PostgreSQL and Redis, starting embedded ones if needed."""
    from shared.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError

    env: dict[str, str] = {}
    postgres = EmbeddedPostgres(data_dir / "postgres") if not settings.database_url else None
    redis = EmbeddedRedis(data_dir / "redis") if not settings.redis_url else None
    try:
        if postgres is not None:
            _say(f"starting embedded PostgreSQL in {postgres.data_dir} ...")
            started = time.monotonic()
            env["COINLYTICS_DATABASE_URL"] = postgres.start()
            _say(f"embedded PostgreSQL ready ({time.monotonic() - started:.1f}s)")
        else:
            _say("using PostgreSQL from COINLYTICS_DATABASE_URL")
        if redis is not None:
            _say(f"starting embedded Redis in {redis.data_dir} ...")
            env["COINLYTICS_REDIS_URL"] = redis.start()
            _say(f"embedded Redis ready on 127.0.0.1:{redis.port}")
        else:
            _say("using Redis from COINLYTICS_REDIS_URL")
        yield env
    except EmbeddedServerError as exc:
        _fail(str(exc))
    finally:
        if redis is not None:
            redis.stop()
            _say("embedded Redis stopped")
        if postgres is not None:
            postgres.stop()
            _say("embedded PostgreSQL stopped")


def wait_for_redis(url: str, timeout: float = 20.0) -> None:
    import redis as redis_sync

    deadline = time.monotonic() + timeout
    client = redis_sync.Redis.from_url(url, socket_connect_timeout=2)
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis_sync.RedisError as exc:
            if time.monotonic() > deadline:
                _fail(f"Redis at {url} does not answer: {exc}")
            time.sleep(0.5)


def migrate(database_url: str) -> None:
    from shared.migrate import upgrade

    started = time.monotonic()
    try:
        upgrade(database_url)
    except Exception as exc:
        _fail(f"could not apply database migrations: {type(exc).__name__}: {exc}")
    _say(f"database schema up to date ({time.monotonic() - started:.1f}s)")


def cmd_migrate(_args: argparse.Namespace) -> None:
    try:
        settings = load_settings()
        url = settings.require_database_url()
    except ConfigurationError as exc:
        _fail(str(exc))
    migrate(url)


def cmd_run(args: argparse.Namespace) -> None:
    from coinlytics.launcher import Launcher

    started = time.monotonic()
    if args.sources:
        os.environ["COINLYTICS_SOURCES"] = args.sources
    data_dir = Path(os.environ.get("COINLYTICS_DATA_DIR", "./.coinlytics")).resolve()
    secret_env: dict[str, str] = {}
    if os.environ.get("COINLYTICS_ENV", "production") != "development":
        generated = ensure_secrets(data_dir)
        for name, value in generated.items():
            if not os.environ.get(name):
                secret_env[name] = value
        if secret_env:
            _say(f"using generated secrets from {data_dir / SECRETS_FILE}")
    os.environ.update(secret_env)
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        _fail(str(exc))
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    if "sim" in settings.sources:
        _say("the 'sim' source is on: prices are SIMULATED (sources named sim-*), not market data")
    with infrastructure(settings, data_dir) as infra_env:
        database_url = infra_env.get("COINLYTICS_DATABASE_URL") or settings.require_database_url()
        redis_url = infra_env.get("COINLYTICS_REDIS_URL") or settings.require_redis_url()
        wait_for_redis(redis_url)
        migrate(database_url)
        env = dict(os.environ)
        env.update(infra_env)
        env.update({"COINLYTICS_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"})
        env.setdefault("COINLYTICS_LOG_FORMAT", "console")
        check_server_versions(database_url, redis_url)
        launcher = Launcher({s: [sys.executable, "-m", f"services.{s}"] for s in SERVICES}, env=env, say=_say)
        _say(f"infrastructure ready in {time.monotonic() - started:.1f}s; starting {len(SERVICES)} services")
        _say(f"gateway:   http://127.0.0.1:{settings.gateway_port}")
        _say(f"explorer:  http://127.0.0.1:{settings.gateway_port}/docs")
        _say(f"try:       curl 'http://127.0.0.1:{settings.gateway_port}/api/v1/prices?symbols=BTC&vs=USD'")
        _say(f"status:    http://127.0.0.1:{settings.gateway_port}/api/v1/status")
        _say("press Ctrl-C to stop everything; a service that crashes is restarted")
        code = launcher.run()
    raise SystemExit(code)


def check_server_versions(database_url: str, redis_url: str) -> None:
    """Refuse servers older than the supported minimum before any service starts (each service checks too)."""
    import asyncio

    from shared.db import create_engine
    from shared.server_versions import UnsupportedServerError, ensure_supported_servers
    from shared.service_app import redis_client

    async def check() -> dict[str, str]:
        engine = create_engine(database_url)
        redis = redis_client(redis_url)
        try:
            return await ensure_supported_servers(engine, redis)
        finally:
            await redis.aclose()
            await engine.dispose()

    try:
        versions = asyncio.run(check())
    except UnsupportedServerError as exc:
        _fail(str(exc))
    _say(f"PostgreSQL {versions['postgres']}, Redis {versions['redis']}")


def cmd_backfill(args: argparse.Namespace) -> None:
    import asyncio

    from services.pricing.history.backfill import BACKFILL_INTERVALS, BackfillError, describe, parse_coins, run_backfill
    from shared.timeparse import parse_time

    coins = parse_coins(args.coins)
    intervals = parse_coins(args.intervals.replace("M", "m").replace("H", "h").replace("D", "d"))
    intervals = [i.lower() for i in intervals]
    unknown = [i for i in intervals if i not in BACKFILL_INTERVALS]
    if not coins or unknown or not intervals or args.days <= 0:
        _fail(f"give --coins, --days > 0 and --intervals from {','.join(BACKFILL_INTERVALS)}")
    data_dir = Path(os.environ.get("COINLYTICS_DATA_DIR", "./.coinlytics")).resolve()
    if os.environ.get("COINLYTICS_ENV", "production") != "development":
        for name, value in ensure_secrets(data_dir).items():
            os.environ.setdefault(name, value)
    try:
        settings = load_settings()
        end = parse_time(args.end, "--end") if args.end else None
    except Exception as exc:
        _fail(str(exc))
    from shared.embedded import EmbeddedPostgres, EmbeddedServerError

    postgres = EmbeddedPostgres(data_dir / "postgres") if not settings.database_url else None
    try:
        if postgres is not None:
            settings = settings.model_copy(update={"database_url": postgres.start()})
        migrate(settings.require_database_url())
        _say(f"backfilling {','.join(coins)} in {args.vs.upper()} from {args.source}: {args.days:g} days")
        report = asyncio.run(
            run_backfill(settings, coins=coins, vs=args.vs.upper(), days=args.days, source=args.source,
                         intervals=intervals, end=end, show_progress=not args.quiet)
        )  # fmt: skip
    except (BackfillError, EmbeddedServerError) as exc:
        _fail(str(exc))
    finally:
        if postgres is not None:
            postgres.stop()
    for line in describe(report):
        _say(line)


def cmd_create_admin(args: argparse.Namespace) -> None:
    """Makes the first administrator: promotes an existing account, or creates one with the given password."""
    import asyncio
    import getpass

    from prometheus_client import CollectorRegistry

    from services.gateway.auth.schemas import PASSWORD_MAX, PASSWORD_MIN
    from services.gateway.auth.service import AuthService
    from shared.auth import Denylist
    from shared.errors import AppError
    from shared.service_app import open_resources
    from shared.validation import normalise_email

    try:
        settings = load_settings()
        settings.require_database_url()
        settings.require_redis_url()
        email = normalise_email(args.email)
    except ConfigurationError as exc:
        _fail(str(exc))
    except ValueError:
        _fail(f"{args.email!r} is not an email address")
    password: str | None = None
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("password for a new account (Enter to only promote an existing one): ") or None
    if password is not None and not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        _fail(f"the password needs {PASSWORD_MIN} to {PASSWORD_MAX} characters")

    async def run() -> tuple[str, bool]:
        async with open_resources(settings, CollectorRegistry()) as res:
            service = AuthService(settings, res.sessions, res.redis, res.publisher, Denylist(res.redis, settings))
            user, created = await service.ensure_admin(email, password)
            return str(user.id), created

    try:
        user_id, created = asyncio.run(run())
    except AppError as exc:
        _fail(exc.message)
    _say(f"{'created administrator' if created else 'promoted to administrator'}: {email} ({user_id})")


def cmd_report(args: argparse.Namespace) -> None:
    """Prints (or writes) the report of a window of the system log: text, the API's JSON, or an HTML page."""
    from services.gateway.reports.service import build_report, window
    from shared.errors import AppError
    from shared.system_log import log_files

    try:
        # The report reads a file and signs nothing: throwaway secrets keep a production environment without
        # the platform's secrets (an operator's shell) from being refused.
        settings = load_settings(jwt_secret=secrets.token_urlsafe(48), hmac_key=secrets.token_urlsafe(48))
        since, until = window(args.since, args.until)
    except ConfigurationError as exc:
        _fail(str(exc))
    except AppError as exc:
        _fail(exc.message.replace("since:", "--since:", 1).replace("until:", "--until:", 1))
    path = settings.system_log_file()
    if not log_files(path):
        _fail(f"no system log at {path}: set COINLYTICS_DATA_DIR (or COINLYTICS_SYSTEM_LOG_PATH) to the platform's")
    report = build_report(path, since, until)
    target: Path | None
    if args.format == "html":
        from services.gateway.reports.html import render_html

        content = render_html(report)
        target = Path(args.output or "coinlytics-report.html").resolve()
    elif args.format == "json":
        content = report.model_dump_json(indent=2) + "\n"
        target = Path(args.output).resolve() if args.output else None
    else:
        from services.gateway.reports.text import render_text

        content = render_text(report)
        target = Path(args.output).resolve() if args.output else None
    if target is None:
        sys.stdout.write(content)
        return
    try:
        target.write_text(content, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write {target}: {exc.strerror or exc}")
    _say(f"report written to {target}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coinlytics", description="Coinlytics market-data platform")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start PostgreSQL/Redis (embedded if not configured) and every service")
    run.add_argument("--sources", help="override COINLYTICS_SOURCES, e.g. --sources sim")
    run.set_defaults(func=cmd_run)
    mig = sub.add_parser("migrate", help="apply database migrations to COINLYTICS_DATABASE_URL")
    mig.set_defaults(func=cmd_migrate)
    admin = sub.add_parser("create-admin", help="make an account an administrator (creating it if needed)")
    admin.add_argument("--email", required=True)
    admin.add_argument("--password-stdin", action="store_true", help="read the new account's password from stdin")
    admin.set_defaults(func=cmd_create_admin)
    fill = sub.add_parser("backfill", help="load past OHLCV candles from an exchange (resumable; see docs/history.md)")
    fill.add_argument("--coins", required=True, help="comma-separated coins, e.g. BTC,ETH")
    fill.add_argument("--days", type=float, required=True, help="how far back from --end")
    fill.add_argument("--vs", default="USD", help="currency; stablecoin markets count toward USD (default USD)")
    fill.add_argument("--source", default="binance", help="exchange (any ccxt name, default binance)")
    fill.add_argument("--intervals", default="1m,1h,1d", help="candle intervals to load (default 1m,1h,1d)")
    fill.add_argument("--end", help="ISO 8601 or Unix seconds (default now)")
    fill.add_argument("--quiet", action="store_true", help="no progress bar")
    fill.set_defaults(func=cmd_backfill)
    report = sub.add_parser("report", help="requests, tasks, sources and alerts of a window, from the system log")
    report.add_argument("--since", default="24h", help="a span (15m, 24h, 7d) or an ISO 8601 moment (default 24h)")
    report.add_argument("--until", help="the window's end, ISO 8601 (default now)")
    report.add_argument("--format", choices=("text", "json", "html"), default="text", help="default text")
    report.add_argument("--output", help="file to write (html default: coinlytics-report.html here)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

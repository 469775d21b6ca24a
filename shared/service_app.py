"""What every service's app has in common: resources owned by the lifespan, health, readiness and
metrics endpoints, correlation ids, the error handlers, and the process entry point."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import structlog
import uvicorn
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.auth import InternalAuthMiddleware
from shared.db import create_engine, session_factory
from shared.docs import install_docs
from shared.errors import error_response, install_error_handlers
from shared.logging import CorrelationIdMiddleware, active_system_log, configure_logging, get_correlation_id
from shared.server_versions import UnsupportedServerError, ensure_supported_servers
from shared.settings import SERVICE_PORTS, ConfigurationError, Settings, load_settings
from shared.streams import StreamMetrics, StreamPublisher
from shared.supervisor import Supervisor
from shared.system_log import DroppedLinesCollector, SystemLog

log = structlog.get_logger("service")

T = TypeVar("T")


@dataclass
class Resources:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis
    publisher: StreamPublisher
    registry: CollectorRegistry
    # The metrics every stream consumer of the service reports into (registered once in ``registry``).
    stream_metrics: StreamMetrics
    # Every long-running task of the service runs under it; /readyz reports what it knows.
    supervisor: Supervisor
    # The system log writer the app was built with (structlog's, taken when the app was built; None: none).
    system_log: SystemLog | None = None


def redis_client(url: str) -> Redis:
    return Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)


@asynccontextmanager
async def open_resources(
    settings: Settings, registry: CollectorRegistry, service: str = "service", system_log: SystemLog | None = None
) -> AsyncIterator[Resources]:
    engine = create_engine(settings.require_database_url())
    redis = redis_client(settings.require_redis_url())
    supervisor = Supervisor(service, registry)
    try:
        yield Resources(
            settings=settings,
            engine=engine,
            sessions=session_factory(engine),
            redis=redis,
            publisher=StreamPublisher(redis, namespace=settings.redis_namespace, maxlen=settings.stream_maxlen),
            registry=registry,
            stream_metrics=StreamMetrics(registry),
            supervisor=supervisor,
            system_log=system_log,
        )
    finally:
        await supervisor.stop()
        await redis.aclose()
        await engine.dispose()


def get_resources(request: Request) -> Resources:
    resources: Resources = request.app.state.resources
    return resources


def state_of(connection: HTTPConnection, name: str, kind: type[T]) -> T:
    """What the service's lifespan put on ``app.state`` under ``name``, checked to be a ``kind``."""
    value = getattr(connection.app.state, name, None)
    if not isinstance(value, kind):
        raise RuntimeError(f"the lifespan did not set app.state.{name} ({kind.__name__})")
    return value


def lifespan_state(name: str, kind: type[T]) -> Callable[[HTTPConnection], Awaitable[T]]:
    """The one way a route gets a service object: a FastAPI dependency returning what the service's lifespan
    put on ``app.state`` under ``name``. Use it through an alias in the service's api module::

        Pricing = Annotated[PricingService, Depends(lifespan_state("pricing", PricingService))]

    A coroutine on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop per
    request that cost about a fifth of a price read's CPU for one attribute lookup. Code that calls it as a
    plain function (outside dependency injection) uses ``lifespan_getter`` instead.
    """

    # HTTPConnection, not Request: FastAPI fills it for websocket routes too.
    async def dependency(request: HTTPConnection) -> T:
        return state_of(request, name, kind)

    dependency.__name__ = f"{name}_from_lifespan"
    return dependency


def lifespan_getter(name: str, kind: type[T]) -> Callable[[HTTPConnection], T]:
    """``lifespan_state`` as a plain function, for code that calls it directly rather than through Depends."""

    def getter(connection: HTTPConnection) -> T:
        return state_of(connection, name, kind)

    getter.__name__ = f"{name}_from_lifespan"
    return getter


# How long a service keeps an idle keep-alive connection open; the gateway's pool closes its own sooner.
SERVICE_KEEPALIVE_SECONDS = 75
UPSTREAM_KEEPALIVE_SECONDS = 60
# A service names the route template that answered; the gateway reads it back from what it forwarded and
# puts it on its own scope under ROUTE_TEMPLATE_KEY, so its metrics and system log say "/api/v1/prices"
# rather than its one forwarding route.
ROUTE_HEADER = "x-coinlytics-route"
ROUTE_HEADER_BYTES = ROUTE_HEADER.encode()
ROUTE_TEMPLATE_KEY = "coinlytics.route_template"
# Probes and scrapes: frequent, and not what an operator reads the log for.
UNLOGGED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# A path is the caller's input: a very long one is cut in the log line.
MAX_LOGGED_PATH = 2048


class MetricsMiddleware:
    """Counts requests and their latency by route template (not raw path, to bound label cardinality)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, *, advertise_route: bool = True) -> None:
        self.app = app
        self.advertise_route = advertise_route
        self.requests = Counter(
            "http_requests_total", "HTTP requests", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=registry
        )
        # request_started / request_finished for the system log. A concrete logger, bound once when the app
        # first runs (after configure_logging): structlog's lazy proxy would rebuild one on every call.
        self.log = structlog.get_logger("http").bind()
        is_enabled_for = getattr(self.log, "is_enabled_for", None)
        self.log_requests = is_enabled_for is None or bool(is_enabled_for(logging.INFO))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        path = scope["path"]
        logged = self.log_requests and path not in UNLOGGED_PATHS
        if logged:
            path = path[:MAX_LOGGED_PATH]
            self.log.info("request_started", method=scope["method"], path=path, correlation_id=get_correlation_id())

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = scope.get("route") if self.advertise_route else None
                if route is not None:
                    # The gateway labels what it forwarded with this template instead of its catch-all.
                    message["headers"] = [*message.get("headers", []), (ROUTE_HEADER_BYTES, route.path.encode())]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            template = scope.get(ROUTE_TEMPLATE_KEY) or getattr(scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - started
            self.requests.labels(scope["method"], template, str(status)).inc()
            self.latency.labels(scope["method"], template).observe(elapsed)
            if logged:
                self.log.info(
                    "request_finished", method=scope["method"], path=path, route=template, status=status,
                    duration_ms=round(elapsed * 1000, 3), correlation_id=get_correlation_id(),
                )  # fmt: skip


def ops_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", summary="Liveness: the process answers")
    async def healthz(request: Request) -> dict[str, str]:
        return {"status": "ok", "service": request.app.state.service}

    @router.get(
        "/readyz",
        summary="Readiness: PostgreSQL and Redis reachable, every background task running and not stalled",
        description="`scope=traffic` (for a load balancer's or Kubernetes' readiness probe) checks only what "
        "serving requests needs, PostgreSQL: during a Redis outage or a stalled consumer the service still "
        "answers what it can (reads fall back to PostgreSQL) instead of being taken out of rotation; the full "
        "answer stays here for operators and `/api/v1/status`.",
    )
    async def readyz(request: Request, scope: Literal["all", "traffic"] = Query(default="all")) -> JSONResponse:
        resources: Resources = request.app.state.resources
        checks: dict[str, str] = {}
        try:
            async with asyncio.timeout(3):
                async with resources.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"unavailable: {type(exc).__name__}"
        if scope == "traffic":
            if checks["postgres"] == "ok":
                return JSONResponse({"status": "ready", "service": request.app.state.service, "checks": checks})
            return error_response(503, "not_ready", "PostgreSQL is unavailable", checks, headers={"Retry-After": "5"})
        try:
            async with asyncio.timeout(3):
                await resources.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"unavailable: {type(exc).__name__}"
        problems = await resources.supervisor.problems()
        checks["tasks"] = "ok" if not problems else "; ".join(f"{name}: {why}" for name, why in problems.items())
        if all(v == "ok" for v in checks.values()):
            return JSONResponse(
                {
                    "status": "ready",
                    "service": request.app.state.service,
                    "checks": checks,
                    "tasks": resources.supervisor.describe(),
                }
            )
        details = {**checks, "problems": problems, "tasks": resources.supervisor.describe()}
        message = "a dependency is unavailable" if problems == {} else "a background task is down or stalled"
        return error_response(503, "not_ready", message, details, headers={"Retry-After": "5"})

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        resources: Resources = request.app.state.resources
        return Response(generate_latest(resources.registry), media_type=CONTENT_TYPE_LATEST)

    return router


ServiceLifespan = Callable[[FastAPI, Resources], AbstractAsyncContextManager[None]]


def build_service_app(
    service: str,
    settings: Settings,
    *,
    title: str,
    description: str,
    routers: list[APIRouter],
    lifespan: ServiceLifespan | None = None,
    openapi_tags: list[dict[str, Any]] | None = None,
    serve_docs: bool = True,
) -> FastAPI:
    registry = CollectorRegistry()
    # system_log_dropped_lines_total: read from the app's system log writer when scraped (0 without one): the
    # one structlog writes to when the app is built (serve configures logging first). The app keeps its own
    # reference, so logging configured again later in the process (another app, a test) leaves its count.
    system_log = active_system_log()
    registry.register(DroppedLinesCollector(system_log))

    @asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_resources(settings, registry, service, system_log=system_log) as resources:
            app.state.resources = resources
            try:
                versions = await ensure_supported_servers(resources.engine, resources.redis)
            except UnsupportedServerError as exc:
                log.error("unsupported_server", service=service, error=str(exc))
                sys.stderr.write(f"{service}: cannot start: {exc}\n")
                raise
            except Exception as exc:  # unreachable now: readiness reports it, the tasks retry
                log.warning("server_versions_not_checked", service=service, error=f"{type(exc).__name__}: {exc}")
            else:
                log.info("servers_supported", service=service, **versions)
            log.info("service_starting", service=service)
            if lifespan is None:
                try:
                    yield
                finally:
                    await resources.supervisor.stop()
            else:
                async with lifespan(app, resources):
                    try:
                        yield
                    finally:
                        # Background tasks end before the service's own clean-up closes what they use.
                        await resources.supervisor.stop()
            log.info("service_stopping", service=service)

    app = FastAPI(
        title=title,
        description=description,
        version="0.1.0",
        lifespan=app_lifespan,
        openapi_tags=openapi_tags,
        openapi_url="/openapi.json" if serve_docs else None,
        # The explorer pages are ours (shared/docs.py): FastAPI's own load their assets from a CDN.
        docs_url=None,
        redoc_url=None,
        # Decimals go out as JSON numbers (DecimalJSONResponse); the serialization-mode schema would call
        # them strings, the validation-mode one allows numbers.
        separate_input_output_schemas=False,
    )
    app.state.service = service
    app.state.settings = settings
    install_error_handlers(app)
    if service != "gateway":
        # Behind the gateway: identity arrives in its signed credential (docs/security.md).
        app.add_middleware(InternalAuthMiddleware, settings=settings)
    # Only services behind the gateway name their route to it; the gateway itself has no one to tell.
    app.add_middleware(MetricsMiddleware, registry=registry, advertise_route=service != "gateway")
    app.add_middleware(CorrelationIdMiddleware)
    app.include_router(ops_router())
    if serve_docs:
        install_docs(app, openapi_url="/openapi.json", title=title)
    for router in routers:
        app.include_router(router)
    return app


def serve(service: str, create_app: Callable[[Settings], FastAPI]) -> None:
    """Process entry point: readable configuration errors, logging, then uvicorn."""
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        sys.stderr.write(f"{service}: cannot start: {exc}\n")
        raise SystemExit(2) from None
    # Every service process of this data dir appends to the one system log (shared/system_log.py).
    configure_logging(
        service, settings.log_level, settings.log_format, system_log=SystemLog.for_settings(settings, service)
    )
    try:
        settings.require_database_url()
        settings.require_redis_url()
        app = create_app(settings)
    except ConfigurationError as exc:
        sys.stderr.write(f"{service}: cannot start: {exc}\n")
        raise SystemExit(2) from None
    port = settings.gateway_port if service == "gateway" else _port_from_url(settings, service)
    host = "0.0.0.0" if service == "gateway" and settings.host == "0.0.0.0" else settings.host
    log.info("service_listening", service=service, url=f"http://{host}:{port}")
    # Proxy headers off: uvicorn would believe X-Forwarded-For from FORWARDED_ALLOW_IPS (even "*"); the gateway
    # applies COINLYTICS_TRUSTED_PROXIES itself (services/gateway/security.py).
    uvicorn.run(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="on", proxy_headers=False,
        # Websockets (the gateway's live push): no per-message compression, which pushed the fan-out of one
        # price to 1,000 sockets past 100 ms at p99, and no frame larger than a client message can usefully be
        # (uvicorn would otherwise buffer 16 MiB before the handler's own size check runs).
        ws_per_message_deflate=False, ws_max_size=65_536,
        # Idle keep-alive connections live longer than the gateway's pool keeps them (UPSTREAM_KEEPALIVE_SECONDS):
        # with uvicorn's 5 s the pool reused connections the service was closing, and that race was a 502.
        timeout_keep_alive=SERVICE_KEEPALIVE_SECONDS,
    )  # fmt: skip


def _port_from_url(settings: Settings, service: str) -> int:
    from urllib.parse import urlparse

    parsed = urlparse(settings.service_url(service))
    return parsed.port or SERVICE_PORTS[service]

"""The gateway's app: its lifespan owns the connection pool to the internal services and the accounts
service; its middleware is the platform's HTTP hardening (services/gateway/security.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.routing import Route

from services.gateway import security
from services.gateway import tasks as gateway_tasks
from services.gateway.api import FORWARD_ROUTE, ForwardFirstRoute, OwnMethods, own_routes, router, service_only_segments
from services.gateway.auth import tasks as auth_tasks
from services.gateway.auth.api import router as auth_router
from services.gateway.auth.service import AuthService
from services.gateway.compat.api import router as compat_router
from services.gateway.compat.service import CompatService
from services.gateway.consumers import activity_consumer
from services.gateway.live.api import router as live_router
from services.gateway.live.service import LiveHub
from services.gateway.memo import ReadMemo
from services.gateway.ratelimit import SlidingWindowLimiter
from services.gateway.reports.api import router as reports_router
from services.gateway.reports.service import ReportService
from services.gateway.service import Upstreams
from services.gateway.tasks_monitor.api import router as tasks_monitor_router
from services.gateway.tasks_monitor.service import TaskMonitor
from services.gateway.web.api import not_found_page
from services.gateway.web.api import router as web_router
from services.gateway.web.api import session_router as web_session_router
from services.gateway.web.service import STATIC as WEB_STATIC
from services.gateway.web.service import WebService
from shared.auth import Authenticator, Denylist, build_verifier
from shared.docs import install_docs
from shared.jobs import JobQueue, supervise_worker
from shared.service_app import Resources, build_service_app
from shared.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    verifier = build_verifier(settings)  # configuration errors surface before the server starts

    @asynccontextmanager
    async def lifespan(app: FastAPI, resources: Resources) -> AsyncIterator[None]:
        denylist = Denylist(resources.redis, settings)
        app.state.authenticator = Authenticator(verifier, denylist)
        app.state.limiter = SlidingWindowLimiter(resources.redis, settings.key("ratelimit"))
        app.state.auth = AuthService(settings, resources.sessions, resources.redis, resources.publisher, denylist)
        app.state.web = WebService(settings, app.state.auth)
        memo = ReadMemo(resources.registry)
        app.state.upstreams = Upstreams(settings, memo)
        app.state.compat = CompatService(settings, app.state.upstreams)
        app.state.reports = ReportService(settings.system_log_file(), settings.system_log_retention_days)
        app.state.tasks_monitor = TaskMonitor(settings, resources.redis, JobQueue(settings))
        hub = LiveHub(
            settings, resources.redis, resources.sessions, app.state.authenticator, app.state.limiter, app.state.auth,
            registry=resources.registry, memo=memo,
        )  # fmt: skip
        app.state.live_hub = hub
        resources.supervisor.start("live-hub", hub.run, check=hub.stall_reason)
        activity = activity_consumer(resources.redis, settings, resources.sessions, metrics=resources.stream_metrics)
        resources.supervisor.start("activity-consumer", activity.run, check=activity.stall_reason)
        supervise_worker(
            resources.supervisor,
            settings,
            "gateway",
            cron_jobs=[*auth_tasks.cron_jobs(), *gateway_tasks.cron_jobs()],
            ctx={"settings": settings, "sessions": resources.sessions},
        )
        try:
            yield
        finally:
            await app.state.auth.close()
            await app.state.upstreams.close()
            await app.state.tasks_monitor.jobs.close()

    gateway_routers = [
        auth_router,
        router,
        live_router,
        reports_router,
        tasks_monitor_router,
        compat_router,
        web_session_router,
        web_router,
    ]
    app = build_service_app(
        "gateway",
        settings,
        title="Coinlytics API",
        description="The public API of Coinlytics.",
        # The forwarding catch-all is appended after these, so it never shadows a documented route.
        routers=gateway_routers,
        lifespan=lifespan,
        serve_docs=False,
    )
    app.state.own_routes = own_routes(
        auth_router, router, reports_router, tasks_monitor_router, web_session_router, web_router
    )
    # The merged spec is the gateway's own /openapi.json route (services/gateway/api.py).
    install_docs(app, openapi_url="/openapi.json", title="Coinlytics API")
    # The dashboard's stylesheet, scripts and icon (services/gateway/web/static), from this origin only.
    app.mount("/static", StaticFiles(directory=WEB_STATIC), name="web-static")
    app.state.own_methods = OwnMethods(app.state.own_routes)
    app.router.routes.append(FORWARD_ROUTE)
    # Tried first, only for the path segments that no route above could answer (services/gateway/api.py).
    own_paths = [route for r in gateway_routers for route in r.routes]
    app.router.routes.insert(0, ForwardFirstRoute(service_only_segments(own_paths)))
    # Last of all: an unknown address answers a page to a browser (and the error shape to an API client).
    app.router.routes.append(Route("/{path:path}", not_found_page, methods=["GET"], include_in_schema=False))
    security.install(app, settings)
    return app

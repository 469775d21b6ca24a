"""The gateway's HTTP hardening: security headers, HTTPS enforcement, CORS and a request size limit."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from shared.errors import error_response
from shared.settings import Settings

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            # Only frame-ancestors: the explorer pages (shared/docs.py) run inline scripts.
            (b"content-security-policy", b"frame-ancestors 'none'"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
        ]
        if settings.https_only and settings.hsts_seconds:
            headers.append(
                (b"strict-transport-security", f"max-age={settings.hsts_seconds}; includeSubDomains".encode())
            )
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


class HttpsRedirectMiddleware:
    """Plain-HTTP requests are redirected to the configured public https URL (never to the Host header)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.netloc = urlsplit(settings.public_url).netloc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("scheme") == "http" and scope["path"] not in PROBE_PATHS:
            query = scope.get("query_string", b"").decode("latin-1")
            target = f"https://{self.netloc}{scope['path']}" + (f"?{query}" if query else "")
            await RedirectResponse(target, status_code=308)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for bodies over the limit: at once from Content-Length, or while reading a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await _too_large(self.max_bytes)(scope, receive, send)
                    return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, f"the request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> ASGIApp:
    return error_response(413, "payload_too_large", f"the request body is larger than {limit} bytes", {"limit": limit})


def install(app: FastAPI, settings: Settings) -> None:
    """Outermost first: headers on every answer, trusted proxies' headers, then HTTPS, CORS, and the size
    limit."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Correlation-ID"],
            expose_headers=["Retry-After", "X-Correlation-ID"],
            # Bearer tokens, not cookies: credentials mode stays off.
            allow_credentials=False,
            max_age=600,
        )
    if settings.https_only:
        app.add_middleware(HttpsRedirectMiddleware, settings=settings)
    if settings.trusted_proxies:
        # uvicorn's implementation, run here with our list: the client is the right-most untrusted
        # X-Forwarded-For hop, and the scheme comes from X-Forwarded-Proto, only when the peer is trusted.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    app.add_middleware(SecurityHeadersMiddleware, settings=settings)

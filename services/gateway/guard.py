"""Who is calling the gateway, and whether they may: bearer token -> principal, then the rate limit."""

from __future__ import annotations

from fastapi import Depends, Request

from services.gateway.ratelimit import SlidingWindowLimiter
from services.gateway.web.session import cookie_token
from shared.auth import ANONYMOUS, Authenticator, Principal, bearer_token, oauth2_scheme
from shared.errors import Forbidden, Unauthorized
from shared.service_app import lifespan_state
from shared.settings import Settings

# Called as plain functions as well as through Depends: resolve() also serves the forwarding route.
_settings = lifespan_state("settings", Settings)
_authenticator = lifespan_state("authenticator", Authenticator)
_limiter = lifespan_state("limiter", SlidingWindowLimiter)


def client_address(request: Request) -> str:
    # The proxy-headers middleware (services/gateway/security.py) already replaced the peer with
    # X-Forwarded-For's client when the peer is in COINLYTICS_TRUSTED_PROXIES, so a client can't pick its
    # own address here.
    return request.client.host if request.client else "unknown"


async def resolve(request: Request) -> Principal:
    """The caller's principal (anonymous without a token), counted against its rate limit."""
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    settings = _settings(request)
    authenticator = _authenticator(request)
    limiter = _limiter(request)
    # A bearer token (API clients) or, without one, the dashboard's session cookie (CSRF-checked).
    token = bearer_token(request.headers.get("authorization")) or cookie_token(request)
    principal = await authenticator.authenticate(token) if token else ANONYMOUS
    if principal.user_id is not None:
        await limiter.enforce(
            f"user:{principal.user_id}",
            limit=settings.rate_limit_user,
            window_seconds=settings.rate_limit_window_seconds,
            what="per account",
            fail_open=True,
        )
    else:
        await limiter.enforce(
            f"ip:{client_address(request)}",
            limit=settings.rate_limit_anonymous,
            window_seconds=settings.rate_limit_window_seconds,
            what="per address without a token",
            fail_open=True,
        )
    request.state.principal = principal
    return principal


async def guard_anonymous(request: Request) -> None:
    """For sign-in style routes: counted per client address, whatever token is sent along."""
    settings = _settings(request)
    limiter = _limiter(request)
    await limiter.enforce(
        f"ip:{client_address(request)}",
        limit=settings.rate_limit_anonymous,
        window_seconds=settings.rate_limit_window_seconds,
        what="per address without a token",
    )


async def require_principal(request: Request, _token: str | None = Depends(oauth2_scheme)) -> Principal:
    principal = await resolve(request)
    if principal.user_id is None:
        raise Unauthorized(
            "sign in first: send 'Authorization: Bearer <access token>'", headers={"WWW-Authenticate": "Bearer"}
        )
    return principal


async def require_admin_principal(request: Request, _token: str | None = Depends(oauth2_scheme)) -> Principal:
    principal = await require_principal(request)
    if principal.role != "admin":
        raise Forbidden("this route needs an administrator")
    return principal

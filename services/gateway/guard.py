"""Who is calling the gateway, and whether they may: bearer token, personal API key or session cookie ->
principal, then the rate limit."""

from __future__ import annotations

from fastapi import Depends, Request

from services.gateway.auth.service import AuthService
from services.gateway.ratelimit import SlidingWindowLimiter
from services.gateway.web.session import cookie_token
from shared.auth import ANONYMOUS, Authenticator, Principal, bearer_token, oauth2_scheme
from shared.errors import Forbidden, Unauthorized
from shared.service_app import lifespan_getter
from shared.settings import Settings

# Called as plain functions as well as through Depends: resolve() also serves the forwarding route.
_settings = lifespan_getter("settings", Settings)
_authenticator = lifespan_getter("authenticator", Authenticator)
_limiter = lifespan_getter("limiter", SlidingWindowLimiter)
_auth = lifespan_getter("auth", AuthService)

API_KEY_HEADER = "x-api-key"
# CoinGecko's own names for a key, taken on the compatible routes only, so its clients send ours unchanged.
# Nowhere else is a key read from the query string: URLs end up in logs, proxies and browser histories.
COMPAT_PREFIX = "/api/v3"
COINGECKO_KEY_HEADERS = ("x-cg-demo-api-key", "x-cg-pro-api-key")
COINGECKO_KEY_PARAMS = ("x_cg_demo_api_key", "x_cg_pro_api_key")
# Every header a key may come in: none of them is passed on to the services.
API_KEY_HEADERS = (API_KEY_HEADER, *COINGECKO_KEY_HEADERS)


def presented_key(request: Request) -> str | None:
    """The personal API key the request carries, if any (an empty value counts as none)."""
    key = request.headers.get(API_KEY_HEADER)
    path: str = request.scope["path"]
    if not key and (path == COMPAT_PREFIX or path.startswith(COMPAT_PREFIX + "/")):
        for name in COINGECKO_KEY_HEADERS:
            key = request.headers.get(name)
            if key:
                break
        else:
            for name in COINGECKO_KEY_PARAMS:
                key = request.query_params.get(name)
                if key:
                    break
    key = (key or "").strip()
    return key or None


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
    # A bearer token (API clients), else a personal API key (scripts), else the dashboard's session cookie
    # (CSRF-checked).
    token = bearer_token(request.headers.get("authorization"))
    if token:
        principal = await authenticator.authenticate(token)
    elif (key := presented_key(request)) is not None:
        # The owner's principal: counted below against the owner's per-account limit like a token.
        try:
            principal = await _auth(request).api_keys.authenticate(key, client_address(request))
        except Unauthorized:
            # A wrong key costs a database lookup: counted against the caller's address, so guessing keys
            # meets the anonymous rate limit (429) instead of an unlimited run of 401s.
            await _count_per_address(request, fail_open=True)
            raise
    else:
        token = cookie_token(request)
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
        await _count_per_address(request, fail_open=True)
    request.state.principal = principal
    return principal


async def guard_anonymous(request: Request) -> None:
    """For sign-in style routes: counted per client address, whatever token is sent along; exact, and
    refusing while Redis is down (no fail-open)."""
    await _count_per_address(request, fail_open=False)


async def _count_per_address(request: Request, *, fail_open: bool) -> None:
    settings = _settings(request)
    await _limiter(request).enforce(
        f"ip:{client_address(request)}",
        limit=settings.rate_limit_anonymous,
        window_seconds=settings.rate_limit_window_seconds,
        what="per address without a token",
        fail_open=fail_open,
    )


async def require_principal(request: Request, _token: str | None = Depends(oauth2_scheme)) -> Principal:
    principal = await resolve(request)
    if principal.user_id is None:
        raise Unauthorized(
            "sign in first: send 'Authorization: Bearer <access token>'", headers={"WWW-Authenticate": "Bearer"}
        )
    return principal


async def require_signed_in(request: Request, _token: str | None = Depends(oauth2_scheme)) -> Principal:
    """A signed-in user, not a personal API key: for managing the keys themselves, so a leaked key can't
    mint fresh ones."""
    principal = await require_principal(request)
    if principal.auth_method == "api_key":
        raise Forbidden("this route needs a sign-in (a bearer token), not an API key")
    return principal


async def require_admin_principal(request: Request, _token: str | None = Depends(oauth2_scheme)) -> Principal:
    principal = await require_principal(request)
    if principal.auth_method == "api_key":
        # Key principals never carry the admin role; said plainly so an administrator's script knows why.
        raise Forbidden("admin routes never accept an API key alone; sign in with a bearer token")
    if principal.role != "admin":
        raise Forbidden("this route needs an administrator")
    return principal

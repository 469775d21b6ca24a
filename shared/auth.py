"""Who is calling: bearer-token verification, the revocation denylist, and the gateway's signed internal
credential that carries the caller's identity to the services behind it.

Every service verifies tokens through ``Authenticator`` (one ``TokenVerifier`` chosen by configuration plus
the Redis denylist), so an OIDC issuer such as Keycloak can replace the local secret without code changes:
see docs/security.md.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
import structlog
from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from jose import JWTError, jwt
from redis.asyncio import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import Forbidden, Unauthorized, error_body
from shared.hmac_sign import sign, verify
from shared.settings import ConfigurationError, Settings

log = structlog.get_logger("auth")

TokenType = Literal["access", "refresh"]
Role = Literal["anonymous", "user", "admin", "service"]
# How the gateway identified the caller: a bearer token or the dashboard's cookie ("token"), or a personal
# API key ("api_key": never an administrator, whatever the owner's role).
AuthMethod = Literal["token", "api_key"]
LOCAL_ALGORITHM = "HS256"
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "jti", "sub")
TOKEN_URL = "/api/v1/auth/login"  # noqa: S105 - a path
INTERNAL_HEADERS = ("x-coinlytics-user", "x-coinlytics-role", "x-coinlytics-ts", "x-coinlytics-sig")
_INTERNAL_HEADER_BYTES = frozenset(name.encode() for name in INTERNAL_HEADERS)
_EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()

# Declares the bearer scheme in each OpenAPI spec, so the merged spec's "Authorize" button covers every route.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl=TOKEN_URL, auto_error=False)


class TokenError(Exception):
    """The token is not acceptable; the message is for logs, clients only ever see a generic 401."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str | None
    role: Role
    jti: str | None = None
    family: str | None = None
    expires_at: int | None = None
    auth_method: AuthMethod = "token"

    @property
    def is_admin(self) -> bool:
        return self.role in ("admin", "service")


ANONYMOUS = Principal(user_id=None, role="anonymous")


class TokenVerifier(Protocol):
    async def verify(self, token: str, *, expected_type: TokenType = "access") -> dict[str, Any]:
        """The token's claims if its signature, issuer, audience, lifetime and type hold; else TokenError."""
        ...

    def principal(self, claims: dict[str, Any]) -> Principal: ...


def _decode_options() -> dict[str, Any]:
    options: dict[str, Any] = {f"require_{claim}": True for claim in REQUIRED_CLAIMS}
    options.update({"verify_signature": True, "verify_aud": True, "verify_iss": True, "verify_exp": True})
    return options


class LocalTokenVerifier:
    """Tokens this deployment issued itself, HS256 with COINLYTICS_JWT_SECRET."""

    def __init__(self, secret: str, *, issuer: str, audience: str) -> None:
        self._secret = secret
        self.issuer = issuer
        self.audience = audience

    async def verify(self, token: str, *, expected_type: TokenType = "access") -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != LOCAL_ALGORITHM:
                raise TokenError(f"algorithm {header.get('alg')!r} is not accepted")
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[LOCAL_ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options=_decode_options(),
            )
        except (JWTError, ValueError, TypeError, KeyError) as exc:
            raise TokenError(f"{type(exc).__name__}: {exc}") from None
        if claims.get("typ") != expected_type:
            raise TokenError(f"a {claims.get('typ')!r} token where an {expected_type} token is needed")
        return claims

    def principal(self, claims: dict[str, Any]) -> Principal:
        role = claims.get("role")
        return Principal(
            user_id=str(claims["sub"]),
            role="admin" if role == "admin" else "user",
            jti=str(claims["jti"]),
            family=str(claims["fam"]) if claims.get("fam") else None,
            expires_at=int(claims["exp"]),
        )


class OidcTokenVerifier:
    """Access tokens of an external OpenID Connect issuer (Keycloak, ...), checked against its JWKS."""

    def __init__(
        self,
        *,
        issuer: str,
        jwks_url: str,
        audience: str,
        algorithms: list[str],
        admin_role: str,
        client: httpx.AsyncClient | None = None,
        cache_seconds: float = 300.0,
        unknown_kid_refetch_seconds: float = 30.0,
    ) -> None:
        if any(alg.upper().startswith("HS") or alg.lower() == "none" for alg in algorithms):
            # A symmetric algorithm would let the public JWKS act as a signing key.
            raise ConfigurationError("COINLYTICS_OIDC_ALGORITHMS: only asymmetric algorithms (RS*, ES*, PS*)")
        self.issuer = issuer
        self.jwks_url = jwks_url
        self.audience = audience
        self.algorithms = algorithms
        self.admin_role = admin_role
        self._client = client or httpx.AsyncClient(timeout=5.0)
        self._cache_seconds = cache_seconds
        self._unknown_kid_refetch_seconds = unknown_kid_refetch_seconds
        self._jwks: dict[str, Any] | None = None
        self._fetched_at = 0.0
        self._forced_at: float | None = None

    async def _keys(self, *, force: bool = False) -> dict[str, Any]:
        fresh = time.monotonic() - self._fetched_at < self._cache_seconds
        if self._jwks is None or force or not fresh:
            try:
                response = await self._client.get(self.jwks_url)
                response.raise_for_status()
                self._jwks = response.json()
                self._fetched_at = time.monotonic()
            except (httpx.HTTPError, ValueError) as exc:
                if self._jwks is None:
                    raise TokenError(f"issuer keys unavailable: {exc}") from None
        assert self._jwks is not None
        return self._jwks

    def _may_refetch(self) -> bool:
        return self._forced_at is None or time.monotonic() - self._forced_at >= self._unknown_kid_refetch_seconds

    async def verify(self, token: str, *, expected_type: TokenType = "access") -> dict[str, Any]:
        if expected_type != "access":
            raise TokenError("an external issuer's refresh tokens are not accepted here")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            keys = await self._keys()
            if kid and not any(k.get("kid") == kid for k in keys.get("keys", [])) and self._may_refetch():
                # Perhaps the issuer rotated its keys. Rate-limited: made-up key ids must not turn every
                # request into a fetch from the issuer.
                self._forced_at = time.monotonic()
                keys = await self._keys(force=True)
            claims: dict[str, Any] = jwt.decode(
                token,
                keys,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={**_decode_options(), "verify_at_hash": False},
            )
        except (JWTError, ValueError, TypeError, KeyError) as exc:
            raise TokenError(f"{type(exc).__name__}: {exc}") from None
        # Keycloak marks access tokens typ=Bearer; ID and refresh tokens carry other values.
        if claims.get("typ") not in ("Bearer", "access"):
            raise TokenError(f"a {claims.get('typ')!r} token where an access token is needed")
        return claims

    def principal(self, claims: dict[str, Any]) -> Principal:
        roles = set((claims.get("realm_access") or {}).get("roles") or [])
        return Principal(
            user_id=str(claims["sub"]),
            role="admin" if self.admin_role in roles else "user",
            jti=str(claims["jti"]),
            expires_at=int(claims["exp"]),
        )


def build_verifier(settings: Settings) -> TokenVerifier:
    if settings.token_verifier == "oidc":  # noqa: S105
        if not settings.oidc_issuer or not settings.oidc_jwks_url:
            raise ConfigurationError(
                "COINLYTICS_TOKEN_VERIFIER=oidc needs COINLYTICS_OIDC_ISSUER and COINLYTICS_OIDC_JWKS_URL"
            )
        return OidcTokenVerifier(
            issuer=settings.oidc_issuer,
            jwks_url=settings.oidc_jwks_url,
            audience=settings.oidc_audience or settings.jwt_audience,
            algorithms=settings.oidc_algorithms,
            admin_role=settings.oidc_admin_role,
        )
    return LocalTokenVerifier(settings.jwt_secret_value(), issuer=settings.jwt_issuer, audience=settings.jwt_audience)


class Denylist:
    """Revoked access tokens (by jti) and revoked refresh families, in Redis until the tokens expire."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings

    def _jti_key(self, jti: str) -> str:
        return self.settings.key("auth", "deny", "jti", jti)

    def _family_key(self, family: str) -> str:
        return self.settings.key("auth", "deny", "family", family)

    async def deny_token(self, jti: str, expires_at: int) -> None:
        ttl = max(1, expires_at - int(time.time()) + 1)
        await self.redis.set(self._jti_key(jti), b"1", ex=ttl)

    async def deny_families(self, families: list[str]) -> None:
        """Access tokens of these families stop working at once (they carry their family in ``fam``)."""
        if not families:
            return
        ttl = self.settings.access_token_minutes * 60 + 60
        async with self.redis.pipeline(transaction=False) as pipe:
            for family in families:
                pipe.set(self._family_key(family), b"1", ex=ttl)
            await pipe.execute()

    async def is_denied(self, principal: Principal) -> bool:
        keys = [self._jti_key(principal.jti or "")]
        if principal.family:
            keys.append(self._family_key(principal.family))
        return any(value is not None for value in await self.redis.mget(keys))


# How long a verified token's principal is reused without checking its signature again (never past its
# expiry), and how many are kept.
VERIFIED_TTL_SECONDS = 30.0
VERIFIED_MAX_ENTRIES = 10_000


class Authenticator:
    """Token verification plus the denylist: the one check every service uses for a bearer token.

    A token that verified is remembered for a short while (keyed by a digest of the whole token, so only
    the very same signed token matches; never past its ``exp``): the same caller's next requests skip the
    signature and claims checks. The denylist is still asked on every request, so a revocation holds on
    every replica as soon as the revoking call returned."""

    def __init__(self, verifier: TokenVerifier, denylist: Denylist) -> None:
        self.verifier = verifier
        self.denylist = denylist
        self._verified: dict[bytes, tuple[Principal, float]] = {}

    async def _verified_principal(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = time.time()
        cached = self._verified.get(digest)
        if cached is not None:
            if now < cached[1]:
                return cached[0]
            del self._verified[digest]
        try:
            claims = await self.verifier.verify(token, expected_type="access")
        except TokenError as exc:
            log.info("token_rejected", reason=str(exc)[:200])
            raise Unauthorized("invalid or expired token", headers={"WWW-Authenticate": "Bearer"}) from None
        principal = self.verifier.principal(claims)
        valid_until = min(now + VERIFIED_TTL_SECONDS, float(principal.expires_at or now))
        if valid_until > now:
            if len(self._verified) >= VERIFIED_MAX_ENTRIES:
                del self._verified[next(iter(self._verified))]  # the oldest entry
            self._verified[digest] = (principal, valid_until)
        return principal

    async def authenticate(self, token: str) -> Principal:
        principal = await self._verified_principal(token)
        if await self.denylist.is_denied(principal):
            raise Unauthorized("the token has been revoked", headers={"WWW-Authenticate": "Bearer"})
        return principal


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("use 'Authorization: Bearer <access token>'", headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


# --- the internal credential: gateway -> services ------------------------------------------------


def _internal_payload(method: str, path: str, query: str, body: bytes, timestamp: str, user: str, role: str) -> bytes:
    # A JSON array, so no field's content (a path may hold a decoded newline) can shift another's boundary.
    digest = hashlib.sha256(body).hexdigest() if body else _EMPTY_BODY_SHA256
    fields = ["coinlytics-internal-v2", method.upper(), path, query, digest, timestamp]
    return json.dumps([*fields, user, role]).encode()


def sign_internal(
    key: bytes,
    method: str,
    path: str,
    principal: Principal,
    *,
    query: str = "",
    body: bytes = b"",
    now: float | None = None,
) -> dict[str, str]:
    """Headers that tell a service who the gateway authenticated, bound to this method, path, raw query
    string and body. ``key`` is ``settings.purpose_key("internal")``."""
    timestamp = str(int(now if now is not None else time.time()))
    user = principal.user_id or ""
    payload = _internal_payload(method, path, query, body, timestamp, user, principal.role)
    return {
        "x-coinlytics-user": user,
        "x-coinlytics-role": principal.role,
        "x-coinlytics-ts": timestamp,
        "x-coinlytics-sig": sign(key, payload),
    }


def verify_internal(
    key: bytes,
    method: str,
    path: str,
    headers: dict[str, str],
    *,
    max_skew: float,
    query: str = "",
    body: bytes = b"",
    now: float | None = None,
) -> Principal:
    """The principal the gateway signed for, or TokenError if the credential is missing, forged or stale."""
    values = [headers.get(name) for name in INTERNAL_HEADERS]
    user, role, timestamp, signature = values
    if user is None or role is None or timestamp is None or signature is None:
        raise TokenError("internal credential missing")
    if not verify(key, _internal_payload(method, path, query, body, timestamp, user, role), signature):
        raise TokenError("internal credential signature mismatch")
    try:
        age = abs((now if now is not None else time.time()) - int(timestamp))
    except ValueError:
        raise TokenError("internal credential timestamp malformed") from None
    if age > max_skew:
        raise TokenError("internal credential expired")
    if role not in ("anonymous", "user", "admin", "service"):
        raise TokenError("internal credential role unknown")
    return Principal(user_id=user or None, role=role)  # type: ignore[arg-type]


class InternalAuthMiddleware:
    """Behind the gateway: takes the caller's identity from the gateway's signed credential.

    A present but invalid credential is always refused. A missing one is refused on public routes
    (``/api/v1/...``) when ``internal_auth_required`` is on (the default); health, readiness, metrics and
    the service's own OpenAPI document stay open for probes and for the gateway's spec merge. Admin
    routes also need an admin (or service) role in the credential.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.key = settings.purpose_key("internal")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        # Only the credential's own headers are decoded (the last of a repeated one counts, as before).
        headers = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", []) if k in _INTERNAL_HEADER_BYTES
        }
        method = scope.get("method", "GET") if scope["type"] == "http" else "WS"
        public = path.startswith("/api/v1/")
        principal = ANONYMOUS
        if headers:
            body = b""
            if scope["type"] == "http":
                read = await _read_body(receive, self.settings.max_body_bytes)
                if read is None:
                    await _refuse(scope, receive, send, 413, "payload_too_large", "the request body is too large")
                    return
                body, receive = read
            try:
                principal = verify_internal(
                    self.key,
                    method,
                    path,
                    headers,
                    max_skew=self.settings.internal_auth_max_skew_seconds,
                    query=scope.get("query_string", b"").decode("latin-1"),
                    body=body,
                )
            except TokenError as exc:
                log.warning("internal_credential_rejected", path=path, reason=str(exc))
                await _refuse(scope, receive, send, 401, "unauthorized", "invalid internal credential")
                return
            if path.startswith("/api/v1/admin/") and not principal.is_admin:
                await _refuse(scope, receive, send, 403, "forbidden", "admin routes need an administrator")
                return
        elif public and self.settings.internal_auth_required:
            await _refuse(scope, receive, send, 401, "unauthorized", "call this service through the gateway")
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, Receive] | None:
    """The whole request body (the signature covers it) and a ``receive`` that hands it to the app again;
    None when it is over ``limit``."""
    chunks: list[bytes] = []
    size = 0
    last: Message | None = None
    while True:
        message = await receive()
        if message["type"] != "http.request":
            last = message  # the client went away; the app sees that after the part that arrived
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return last if last is not None else await receive()

    return body, replay


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 4000 + status})
        return
    from fastapi.responses import JSONResponse

    response = JSONResponse(error_body(code, message), status_code=status)
    await response(scope, receive, send)


def current_principal(request: Request) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal or ANONYMOUS


async def require_user(request: Request, _token: str | None = Depends(oauth2_scheme)) -> Principal:
    """Dependency for a service route that needs a signed-in user (the gateway verified the token)."""
    principal = current_principal(request)
    if principal.user_id is None or principal.role == "service":
        raise Unauthorized("sign in first: send 'Authorization: Bearer <access token>'")
    return principal


async def require_local_user(principal: Principal = Depends(require_user)) -> str:
    """Dependency: the signed-in caller's local account id (what users' own rows, such as alerts and saved
    comparisons, are kept under); 401 for a token whose subject is no local account."""
    try:
        return str(uuid.UUID(principal.user_id or ""))
    except ValueError:
        raise Unauthorized("no local account for this token's subject") from None


async def require_admin(request: Request, _token: str | None = Depends(oauth2_scheme)) -> Principal:
    principal = current_principal(request)
    if principal.role == "anonymous":
        raise Unauthorized("sign in first: send 'Authorization: Bearer <access token>'")
    if not principal.is_admin:
        raise Forbidden("this route needs an administrator")
    return principal

"""Routes of accounts: /api/v1/auth/*, /api/v1/users/me* (personal API keys included), /api/v1/admin/users*."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.security import OAuth2PasswordRequestForm

from services.gateway.auth.schemas import (
    AcceptedOut,
    ActivityListOut,
    ActivityOut,
    AdminUserPatch,
    ApiKeyCreatedOut,
    ApiKeyIn,
    ApiKeyOut,
    ApiKeysOut,
    PasswordResetConfirmIn,
    PasswordResetIn,
    RefreshIn,
    RegisterIn,
    TokenOut,
    UserOut,
    UserPatch,
    UsersOut,
)
from services.gateway.auth.service import INVALID_LOGIN, RESET_ACCEPTED, AuthService
from services.gateway.guard import (
    client_address,
    guard_anonymous,
    require_admin_principal,
    require_principal,
    require_signed_in,
)
from shared.auth import Principal
from shared.errors import Unauthorized, error_responses
from shared.service_app import lifespan_state
from shared.validation import normalise_email

router = APIRouter()
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


Auth = Annotated[AuthService, Depends(lifespan_state("auth", AuthService))]


def _user_out(user: object) -> UserOut:
    return UserOut.model_validate(user, from_attributes=True)


@router.post(
    "/api/v1/auth/register",
    status_code=201,
    response_model=UserOut,
    tags=["auth"],
    summary="Create an account",
    description='Creates a user and sends a welcome email. Example body: `{"email": "ada@example.com", '
    '"password": "correct horse battery staple"}` (10 to 256 characters).',
    responses=error_responses(409, 422, 429),
    dependencies=[Depends(guard_anonymous)],
)
async def register(body: RegisterIn, request: Request, auth: Auth) -> UserOut:
    user = await auth.register(body.email, body.password, client_address(request))
    return _user_out(user)


@router.post(
    "/api/v1/auth/login",
    response_model=TokenOut,
    tags=["auth"],
    summary="Sign in (OAuth2 password form)",
    description="Form fields `username` (the email address) and `password`; answers an access token "
    "(minutes) and a refresh token. Example: `curl -d username=ada@example.com -d password=... "
    "/api/v1/auth/login`. A wrong password and an unknown address get the same 401.",
    responses=error_responses(401, 422, 429),
    dependencies=[Depends(guard_anonymous)],
)
async def login(
    request: Request, auth: Auth, response: Response, form: OAuth2PasswordRequestForm = Depends()
) -> TokenOut:
    try:
        email = normalise_email(form.username)
    except ValueError:
        # Same answer as a wrong password: the form's shape says nothing about accounts.
        raise Unauthorized(INVALID_LOGIN, headers={"WWW-Authenticate": "Bearer"}) from None
    tokens = await auth.login(email, form.password, client_address(request))
    response.headers.update(NO_STORE)
    return tokens


@router.post(
    "/api/v1/auth/refresh",
    response_model=TokenOut,
    tags=["auth"],
    summary="Exchange a refresh token for a new pair",
    description='Example body: `{"refresh_token": "eyJ..."}`. The presented token is spent; presenting it '
    "again revokes every token of that sign-in.",
    responses=error_responses(401, 422, 429),
    dependencies=[Depends(guard_anonymous)],
)
async def refresh(body: RefreshIn, request: Request, auth: Auth, response: Response) -> TokenOut:
    tokens = await auth.refresh(body.refresh_token, client_address(request))
    response.headers.update(NO_STORE)
    return tokens


@router.post(
    "/api/v1/auth/logout",
    status_code=204,
    tags=["auth"],
    summary="Sign out",
    description="Revokes the presented access token (everywhere, at once) and its refresh tokens. "
    "Example: `curl -X POST -H 'Authorization: Bearer eyJ...' /api/v1/auth/logout`.",
    responses=error_responses(401, 403, 429),
)
async def logout(request: Request, auth: Auth, principal: Principal = Depends(require_signed_in)) -> Response:
    # With an API key there is no session to end: refused (403) rather than a 204 that leaves the key working;
    # a key is revoked with DELETE /api/v1/users/me/api-keys/{id}.
    await auth.logout(principal, client_address(request))
    return Response(status_code=204)


@router.post(
    "/api/v1/auth/password-reset",
    status_code=202,
    response_model=AcceptedOut,
    tags=["auth"],
    summary="Ask for a password reset link by email",
    description='Example body: `{"email": "ada@example.com"}`. Always 202, whether or not the address '
    "has an account; the link works once, for 30 minutes. One mail per address every few minutes at most "
    "(`COINLYTICS_PASSWORD_RESET_MAIL_INTERVAL_SECONDS`, 300): requests in between send nothing.",
    responses=error_responses(422, 429, 503),
    dependencies=[Depends(guard_anonymous)],
)
async def password_reset(body: PasswordResetIn, request: Request, auth: Auth) -> AcceptedOut:
    await auth.request_reset(body.email, client_address(request))
    return AcceptedOut(message=RESET_ACCEPTED)


@router.post(
    "/api/v1/auth/password-reset/confirm",
    status_code=204,
    tags=["auth"],
    summary="Set a new password with the emailed token",
    description='Example body: `{"token": "<from the link>", "new_password": "..."}`. Signs the account '
    "out everywhere.",
    responses=error_responses(400, 422, 429),
    dependencies=[Depends(guard_anonymous)],
)
async def password_reset_confirm(body: PasswordResetConfirmIn, request: Request, auth: Auth) -> Response:
    await auth.confirm_reset(body.token, body.new_password, client_address(request))
    return Response(status_code=204)


@router.get(
    "/api/v1/users/me",
    response_model=UserOut,
    tags=["users"],
    summary="Your profile and preferences",
    description="Example: `curl -H 'Authorization: Bearer eyJ...' /api/v1/users/me`.",
    responses=error_responses(401, 429),
)
async def get_me(auth: Auth, principal: Principal = Depends(require_principal)) -> UserOut:
    return _user_out(await auth.me(_own_id(principal)))


@router.patch(
    "/api/v1/users/me",
    response_model=UserOut,
    tags=["users"],
    summary="Change your preferences",
    description='Example body: `{"vs_currency": "EUR", "watchlist": ["BTC", "ETH"]}`. Other fields '
    "(role, email, ...) are refused with 422.",
    responses=error_responses(401, 422, 429),
)
async def patch_me(
    body: UserPatch, request: Request, auth: Auth, principal: Principal = Depends(require_principal)
) -> UserOut:
    return _user_out(await auth.update_me(_own_id(principal), body, client_address(request)))


@router.get(
    "/api/v1/users/me/activity",
    response_model=ActivityListOut,
    tags=["users"],
    summary="Your activity log",
    description="Sign-ins, password and preference changes, newest first, with time and client address. "
    "Example: `/api/v1/users/me/activity?limit=20`.",
    responses=error_responses(401, 422, 429),
)
async def my_activity(
    auth: Auth,
    principal: Principal = Depends(require_principal),
    limit: int = Query(default=50, ge=1, le=500),
    before_id: int | None = Query(default=None, ge=1, le=2**62, description="only entries older than this id"),
) -> ActivityListOut:
    rows = await auth.activity(_own_id(principal), limit=limit, before_id=before_id)
    items = [ActivityOut.model_validate(r, from_attributes=True) for r in rows]
    return ActivityListOut(items=items, next_before_id=items[-1].id if len(items) == limit else None)


KEYS_DESCRIPTION = (
    "Personal API keys are for scripts: send one as `X-API-Key: cl_live_...` on any /api/v1 route (and, on "
    "the CoinGecko-compatible /api/v3, also as CoinGecko's key headers or query parameters). A key acts as "
    "its owner, counts toward the owner's rate limit, and never opens an admin route. Managing keys needs a "
    "sign-in (a bearer token or the dashboard's session), not a key."
)


@router.post(
    "/api/v1/users/me/api-keys",
    status_code=201,
    response_model=ApiKeyCreatedOut,
    tags=["users"],
    summary="Create a personal API key",
    description=KEYS_DESCRIPTION + ' Example body: `{"name": "portfolio script", "expires_at": '
    '"2027-06-30T00:00:00Z"}` (`expires_at` optional). The answer\'s `key` is shown this once: only its hash '
    "is kept. At most `COINLYTICS_API_KEYS_MAX_PER_USER` (20) live keys per account (409 past that).",
    responses=error_responses(401, 403, 409, 422, 429),
)
async def create_api_key(
    body: ApiKeyIn, request: Request, auth: Auth, response: Response, principal: Principal = Depends(require_signed_in)
) -> ApiKeyCreatedOut:
    key, secret = await auth.api_keys.create(_own_id(principal), body.name, body.expires_at, client_address(request))
    response.headers.update(NO_STORE)
    return ApiKeyCreatedOut.model_validate({**_key_out(key).model_dump(), "key": secret})


@router.get(
    "/api/v1/users/me/api-keys",
    response_model=ApiKeysOut,
    tags=["users"],
    summary="Your personal API keys",
    description="Each key's name, prefix, creation, expiry and last use (to the minute), newest first; "
    "never the secret. Revoked keys are not listed. Example: `curl -H 'Authorization: Bearer eyJ...' "
    "/api/v1/users/me/api-keys`.",
    responses=error_responses(401, 403, 429),
)
async def list_api_keys(auth: Auth, principal: Principal = Depends(require_signed_in)) -> ApiKeysOut:
    keys = await auth.api_keys.list(_own_id(principal))
    return ApiKeysOut(items=[_key_out(k) for k in keys], limit=auth.settings.api_keys_max_per_user)


@router.delete(
    "/api/v1/users/me/api-keys/{key_id}",
    status_code=204,
    tags=["users"],
    summary="Revoke a personal API key",
    description="The key stops working at once, on every gateway replica. Another account's key, an unknown "
    "id and a key already revoked answer 404. Example: `curl -X DELETE -H 'Authorization: Bearer eyJ...' "
    "/api/v1/users/me/api-keys/6f1c...`.",
    responses=error_responses(401, 403, 404, 422, 429),
)
async def revoke_api_key(
    key_id: uuid.UUID, request: Request, auth: Auth, principal: Principal = Depends(require_signed_in)
) -> Response:
    await auth.api_keys.revoke(_own_id(principal), key_id, client_address(request))
    return Response(status_code=204)


def _key_out(key: object) -> ApiKeyOut:
    return ApiKeyOut.model_validate(key, from_attributes=True)


@router.get(
    "/api/v1/admin/users",
    response_model=UsersOut,
    tags=["admin"],
    summary="List accounts (administrators)",
    description="Example: `/api/v1/admin/users?email=example.com&limit=50`.",
    responses=error_responses(401, 403, 422, 429),
)
async def list_users(
    auth: Auth,
    _admin: Principal = Depends(require_admin_principal),
    email: str | None = Query(default=None, max_length=254, description="part of the address"),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> UsersOut:
    users, total = await auth.list_users(limit=limit, offset=offset, email_contains=email)
    return UsersOut(total=total, users=[_user_out(u) for u in users])


@router.patch(
    "/api/v1/admin/users/{user_id}",
    response_model=UserOut,
    tags=["admin"],
    summary="Change an account's role or disable it (administrators)",
    description='Example body: `{"role": "admin"}` or `{"is_active": false}`. The account is signed out so '
    "the change applies at once.",
    responses=error_responses(401, 403, 404, 409, 422, 429),
)
async def patch_user(
    user_id: uuid.UUID,
    body: AdminUserPatch,
    request: Request,
    auth: Auth,
    admin: Principal = Depends(require_admin_principal),
) -> UserOut:
    user = await auth.admin_update_user(admin, user_id, body.role, body.is_active, client_address(request))
    return _user_out(user)


def _own_id(principal: Principal) -> str:
    if principal.user_id is None:
        raise Unauthorized("sign in first")
    try:
        uuid.UUID(principal.user_id)
    except ValueError:
        # An external issuer's subject that has no local account.
        raise Unauthorized("no local account for this token's subject") from None
    return principal.user_id

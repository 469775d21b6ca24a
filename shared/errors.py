"""The one error model. Each exception class carries its HTTP status and code; the handlers
render the contract's shape ``{"error": {"code", "message", "details"}}`` for every 4xx/5xx."""

from __future__ import annotations

import errno
from typing import Any, ClassVar

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger("errors")


class AppError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers or {}


class BadRequest(AppError):
    status = 400
    code = "bad_request"


class Unauthorized(AppError):
    status = 401
    code = "unauthorized"


class Forbidden(AppError):
    status = 403
    code = "forbidden"


class NotFound(AppError):
    status = 404
    code = "not_found"


class UnknownSymbol(NotFound):
    code = "unknown_symbol"


class UnknownCurrency(NotFound):
    code = "unknown_currency"


class MethodNotAllowed(AppError):
    status = 405
    code = "method_not_allowed"


class Conflict(AppError):
    status = 409
    code = "conflict"


class UnsupportedMediaType(AppError):
    status = 415
    code = "unsupported_media_type"


class UpgradeRequired(AppError):
    status = 426
    code = "upgrade_required"


class ValidationFailed(AppError):
    status = 422
    code = "validation_error"


class RateLimited(AppError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, details: Any = None) -> None:
        super().__init__(message, details=details, headers={"Retry-After": str(max(1, retry_after))})


class BadGateway(AppError):
    status = 502
    code = "bad_gateway"


class NoFreshData(AppError):
    status = 503
    code = "no_fresh_data"

    def __init__(self, message: str, *, retry_after: int = 5, details: Any = None) -> None:
        super().__init__(message, details=details, headers={"Retry-After": str(max(1, retry_after))})


class ServiceUnavailable(AppError):
    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, details: Any = None) -> None:
        super().__init__(message, details=details, headers={"Retry-After": str(max(1, retry_after))})


class GatewayTimeout(AppError):
    status = 504
    code = "gateway_timeout"


_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def _clean_validation_errors(errors: Any) -> list[dict[str, Any]]:
    cleaned = []
    for err in errors:
        item = {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": err.get("type")}
        cleaned.append(item)
    return cleaned


async def _app_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    if exc.status >= 500:
        log.warning("request_failed", code=exc.code, message=exc.message, path=request.url.path)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = _clean_validation_errors(exc.errors())
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p not in ("query", "body", "path"))
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    return error_response(422, "validation_error", message, details)


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # FastAPI's answer to a body that isn't even text; for clients it is one more invalid body (422).
        return error_response(422, "validation_error", "the request body could not be parsed", None)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path}"
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, code, message, None, headers)


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled_error", path=request.url.path, error_type=type(exc).__name__)
    return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")


# SQLSTATE classes that mean "the server can't be used right now", not "your statement is wrong":
# 08 connection exception, 53 insufficient resources, 57 operator intervention (shutdown, starting up).
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")


def store_unavailable(exc: BaseException) -> str | None:
    """ "Redis" or "the database" when ``exc`` means that store is unreachable or refusing for now (worth a
    retry later, never the request's fault), else None."""
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return "Redis"
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DBAPIError) and (
            current.connection_invalidated or isinstance(current, OperationalError | InterfaceError)
        ):
            return "the database"
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
            return "the database"
        if isinstance(current, ConnectionError | TimeoutError) or type(current).__name__ in _DRIVER_CONNECTION_ERRORS:
            return "Redis" if isinstance(current, RedisError) else "the database"
        if isinstance(current, FileNotFoundError) and current.filename is None and current.errno == errno.ENOENT:
            # Connecting to PostgreSQL's unix socket (the embedded server's) while it is stopped: the socket
            # file is gone. Opening a missing file names it; a socket connect does not; a FileNotFoundError
            # raised by our own code carries no errno.
            return "the database"
        current = current.__cause__ or current.__context__
    return None


# asyncpg's connection-level errors that carry no SQLSTATE of their own.
_DRIVER_CONNECTION_ERRORS = frozenset({"ConnectionDoesNotExistError", "ConnectionFailureError"})


async def _store_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    # Redis or PostgreSQL unreachable: the request was fine, the platform can't serve it right now.
    store = store_unavailable(exc)
    if store is None:
        return await _unhandled_handler(request, exc)
    log.warning("store_unavailable", path=request.url.path, store=store, error=f"{type(exc).__name__}: {exc}")
    return error_response(
        503, "service_unavailable", f"{store} is unavailable; retry shortly", None, {"Retry-After": "5"}
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error_handler)
    for unavailable in (RedisConnectionError, RedisTimeoutError, DBAPIError, OSError):
        app.add_exception_handler(unavailable, _store_unavailable_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unhandled_handler)


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string", "example": "unknown_symbol"},
                "message": {"type": "string", "example": "unknown coin: FOO"},
                "details": {"nullable": True},
            },
        }
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries declaring the error shape for the given statuses."""
    descriptions = {
        401: "Missing or invalid token",
        403: "Forbidden",
        404: "Unknown coin, currency or object",
        422: "Invalid parameters",
        429: "Rate limited (see Retry-After)",
        502: "A backing service answered badly",
        503: "No fresh data or service unavailable (see Retry-After)",
        504: "A backing service timed out",
    }
    return {
        status: {
            "description": descriptions.get(status, "Error"),
            "content": {"application/json": {"schema": ERROR_SCHEMA}},
        }
        for status in statuses
    }

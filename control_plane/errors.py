"""The control plane's one error shape, `{"error": {"code", "message"}}`, and the one place that makes it.

Handlers raise `ApiError` subclasses; the framework's own exceptions (unknown route, bad JSON, validation)
and database constraint errors are mapped here too, so no endpoint formats an error itself. Status codes:
401 no or bad credentials; 403 signed in but not allowed; 404 no such object *or* an object of an org the
caller is not a member of (never reveal that it exists); 409 conflicts with current state; 422 invalid
input; 429 too many attempts; 503 a database it needs is unreachable. Messages never echo secrets or request bodies.
"""

from __future__ import annotations

import errno
import logging

import asyncpg
import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "ApiError",
    "BadGateway",
    "BadRequest",
    "Conflict",
    "ErrorBody",
    "ErrorDetail",
    "Forbidden",
    "Invalid",
    "NotFound",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "exception_handlers",
]

log = logging.getLogger("rocket_relay.control_plane")


class ErrorDetail(msgspec.Struct, frozen=True):
    code: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


class ApiError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    status = 403
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class Invalid(ApiError):
    status = 422
    code = "invalid_request"


class TooManyRequests(ApiError):
    status = 429
    code = "too_many_requests"


class BadGateway(ApiError):
    """A payment provider refused or failed a call we made for the client."""

    status = 502
    code = "payment_provider_error"


class ServiceUnavailable(ApiError):
    """A service we depend on (Stripe) is not configured or did not answer; worth retrying later."""

    status = 503
    code = "service_unavailable"


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout",
               409: "conflict", 413: "body_too_large", 415: "unsupported_media_type",
               422: "invalid_request", 429: "too_many_requests"}


def _respond(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(ErrorBody(ErrorDetail(code, message)), status_code=status, headers=headers)


def _api_error(_: Request, exc: ApiError) -> Response:
    return _respond(exc.status, exc.code, exc.message, exc.headers)


def _validation_error(_: Request, exc: ValidationException) -> Response:
    # Litestar's detail names the route; the first problem it lists is what a client needs to fix it.
    problems = exc.extra if isinstance(exc.extra, list) else []
    message = "The request is invalid."
    if problems and isinstance(problems[0], dict):
        first = problems[0]
        where = first.get("key") or first.get("source") or ""
        message = f"{first.get('message', 'invalid value')}" + (f" (at `{where}`)" if where else "")
    elif exc.detail and "malformed" in exc.detail:
        message = exc.detail.split(": ", 1)[-1] if ": " in exc.detail else exc.detail
    return _respond(422, "invalid_request", message)


def _http_error(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if status >= 500:
        log.error("HTTP %d from the framework: %s", status, exc.detail)
        return _respond(500, "internal_error", "Internal error.")
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
    return _respond(status, _HTTP_CODES.get(status, "error"), exc.detail or "Request refused.", headers)


def _database_error(_: Request, exc: asyncpg.PostgresError) -> Response:
    # Input that passed validation but not the schema's constraints: the client's mistake, not ours.
    if isinstance(exc, asyncpg.UniqueViolationError):
        return _respond(409, "conflict", "An object with these values already exists.")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return _respond(422, "invalid_reference", "The request refers to an object that does not exist.")
    if isinstance(exc, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)):
        return _respond(422, "invalid_value", "A value in the request is out of range or not allowed.")
    log.exception("database error")
    return _respond(500, "internal_error", "Internal error.")


_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}


def _unreachable_error(request: Request, exc: Exception) -> Response:
    """A store we depend on (PostgreSQL, its read replica, Redis) cannot be reached: say so, and when to
    retry, instead of a bare 500; anything else that is an OSError stays an internal error."""
    unreachable = isinstance(exc, (ConnectionError, TimeoutError, asyncpg.InterfaceError,
                                   asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError,
                                   RedisConnectionError, RedisTimeoutError))
    if not unreachable and isinstance(exc, OSError):
        # asyncpg reports a refused connection to every address as one OSError without its own subclass.
        unreachable = exc.errno in _UNREACHABLE_ERRNOS or "Connect call failed" in str(exc)
    if not unreachable:
        return _internal_error(request, exc)
    log.error("a store is unreachable (%s) on %s %s", type(exc).__name__, request.method, request.url.path)
    return _respond(503, "service_unavailable", "A database the control plane needs is unreachable; retry shortly.",
                    {"retry-after": "5"})


def _unicode_error(_: Request, exc: UnicodeError) -> Response:
    return _respond(422, "invalid_value", "The request holds text that is not valid Unicode.")


def _overflow_error(_: Request, exc: OverflowError) -> Response:
    # Date arithmetic on a client's extreme value (year 1, year 9999) and the like.
    return _respond(422, "invalid_value", "A value in the request is out of range.")


def _recursion_error(request: Request, exc: RecursionError) -> Response:
    # Litestar decodes bodies with msgspec, whose nesting limit is the interpreter's recursion limit: a body
    # nested deeper is the client's mistake. (Nothing of ours recurses on input otherwise.)
    log.info("too deeply nested input on %s %s", request.method, request.url.path)
    return _respond(400, "bad_request", "The request body is nested too deeply.")


def _internal_error(request: Request, exc: Exception) -> Response:
    # Log the type and where, never the request body (it can hold passwords and keys).
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return _respond(500, "internal_error", "Internal error.")


exception_handlers = {
    ApiError: _api_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    asyncpg.CannotConnectNowError: _unreachable_error,
    asyncpg.ConnectionDoesNotExistError: _unreachable_error,
    asyncpg.PostgresError: _database_error,
    asyncpg.InterfaceError: _unreachable_error,
    OSError: _unreachable_error,  # ConnectionError and TimeoutError are OSErrors
    RedisConnectionError: _unreachable_error,
    RedisTimeoutError: _unreachable_error,
    UnicodeError: _unicode_error,
    OverflowError: _overflow_error,
    RecursionError: _recursion_error,
    Exception: _internal_error,
}

"""The proxy's errors: each class carries its HTTP status and OpenAI-style `type`/`code`.

Three kinds, as in asyncpg: the client's mistakes (4xx), the upstream's failures (502/504), and our own
bugs (500). They are turned into a response in exactly one place, `proxy.app.ProxyApp._serve`. Messages
never contain request or response bodies, nor any credential.
"""

from __future__ import annotations

import orjson

__all__ = [
    "AuthenticationError",
    "BodyTooLarge",
    "ByokRejected",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "ModelUnavailable",
    "NotFound",
    "ProxyError",
    "RequestTimeout",
    "TooManyUnfinishedRequests",
    "UpstreamError",
    "UpstreamTimeout",
    "error_body",
]


class ProxyError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or []


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class AuthenticationError(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ModelUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "model_unavailable"


class ByokRejected(ProxyError):
    """The upstream refused the org's own (BYOK) credential: the client's configuration, not our failure."""

    status = 400
    type = "invalid_request_error"
    code = "byok_credential_rejected"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(ProxyError):
    """The client did not send its whole body in time."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class TooManyUnfinishedRequests(ProxyError):
    """The client's address already has as many requests still sending their body as it may."""

    status = 429
    type = "invalid_request_error"
    code = "too_many_unfinished_requests"


class UpstreamError(ProxyError):
    """The upstream refused, broke or answered 5xx; `retryable` says another route may succeed."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"

    def __init__(self, message: str, *, retryable: bool = True, status: int | None = None,
                 code: str | None = None, upstream_status: int | None = None) -> None:
        super().__init__(message, code=code)
        self.retryable = retryable
        self.upstream_status = upstream_status  # the provider's HTTP status, when it answered one
        if status is not None:
            self.status = status


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


def error_body(err: ProxyError) -> bytes:
    return orjson.dumps(
        {"error": {"message": err.message, "type": err.type, "code": err.code, "param": err.param}}
    )

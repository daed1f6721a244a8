"""The proxy's errors: each class carries its HTTP status and OpenAI-style `type`/`code`.

Three kinds, as in asyncpg: the client's mistakes (4xx), the upstream's failures (502/504), and our own
bugs (500). They are turned into a response in exactly one place, `proxy.app.ProxyApp._serve`, rendered by
the client dialect's `ErrorCatalogue` (OpenAI's shape, Anthropic's, the Responses API's stream events).
Messages never contain request or response bodies, nor any credential.
"""

from __future__ import annotations

import orjson

__all__ = [
    "ANTHROPIC_ERRORS",
    "OPENAI_ERRORS",
    "RESPONSES_ERRORS",
    "AuthenticationError",
    "BodyTooLarge",
    "ByokRejected",
    "ErrorCatalogue",
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

    details: dict | None = None  # extra fields of the error object (e.g. which budget refused)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None, details: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or []
        if details is not None:
            self.details = details


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
    error = {"message": err.message, "type": err.type, "code": err.code, "param": err.param}
    if err.details:
        error.update(err.details)
    return orjson.dumps({"error": error})


# ---- rendering, per client dialect -------------------------------------------------------------------------

_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error", 504: "timeout_error",
    529: "overloaded_error",
}
_ANTHROPIC_TYPE_BY_CODE = {
    "invalid_api_key": "authentication_error", "insufficient_quota": "billing_error",
    "rate_limit_exceeded": "rate_limit_error", "model_not_found": "not_found_error",
    "engine_overloaded": "overloaded_error", "overloaded": "overloaded_error",
}


def anthropic_error_type(status: int, code: str | None = None, kind: str | None = None) -> str:
    """Anthropic's error `type` for one of ours (by code first, then by HTTP status)."""
    mapped = _ANTHROPIC_TYPE_BY_CODE.get(code or "") or _ANTHROPIC_TYPE_BY_CODE.get(kind or "")
    if mapped is not None:
        return mapped
    if status:
        return _ANTHROPIC_TYPE_BY_STATUS.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    if kind in ("requests", "tokens"):
        return "rate_limit_error"
    return "invalid_request_error" if kind == "invalid_request_error" else "api_error"


class ErrorCatalogue:
    """How one client dialect is told about an error: a JSON body, or the last event of a broken stream.

    `stream_end` marks the dialect's last event of a whole answer: a client that leaves after it was sent
    was answered in full (a 200), not cancelled."""

    __slots__ = ("name", "stream_end")

    def __init__(self, name: str, *stream_end: bytes) -> None:
        self.name = name
        self.stream_end = stream_end

    def json(self, err: ProxyError) -> bytes:
        return error_body(err)

    def sse(self, message: str, code: str) -> bytes:
        body = orjson.dumps({"error": {"message": message, "type": "upstream_error", "code": code, "param": None}})
        return b"data: " + body + b"\n\n"


class _AnthropicErrors(ErrorCatalogue):
    __slots__ = ()

    def json(self, err: ProxyError) -> bytes:
        kind = anthropic_error_type(err.status, err.code, err.type)
        error = {"type": kind, "message": err.message}
        if err.details:
            error.update(err.details)
        return orjson.dumps({"type": "error", "error": error})

    def sse(self, message: str, code: str) -> bytes:
        body = orjson.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
        return b"event: error\ndata: " + body + b"\n\n"


class _ResponsesErrors(ErrorCatalogue):
    """The Responses API: OpenAI's JSON error; a stream ends with an `error` event."""

    __slots__ = ()

    def sse(self, message: str, code: str) -> bytes:
        body = orjson.dumps({"type": "error", "code": code, "message": message, "param": None})
        return b"event: error\ndata: " + body + b"\n\n"


OPENAI_ERRORS = ErrorCatalogue("openai", b"data: [DONE]")
ANTHROPIC_ERRORS = _AnthropicErrors("anthropic", b"event: message_stop")
RESPONSES_ERRORS = _ResponsesErrors("responses", b"event: response.completed", b"event: response.incomplete")

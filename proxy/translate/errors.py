"""Error bodies: an upstream's error in one dialect → the client's (only the upstream's message is carried)."""

from __future__ import annotations

import orjson

from proxy.errors import anthropic_error_type
from proxy.translate.common import Json, _dumps, _loads

# Anthropic error type → (OpenAI type, OpenAI code), following what OpenAI itself answers (a bad key is an
# invalid_request_error with code invalid_api_key; a rate limit has type "requests").
_OPENAI_ERROR: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "api_error": ("server_error", None),
    "overloaded_error": ("server_error", "overloaded"),
    "timeout_error": ("server_error", "timeout"),
}
def _error_message(body: bytes, status: int) -> tuple[str, Json]:
    """The upstream's error message (or a generic one) and its error object."""
    try:
        obj = _loads(body) if body else None
    except orjson.JSONDecodeError:
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, str):
        return err, {}
    err = err if isinstance(err, dict) else {}
    message = err.get("message")
    if not isinstance(message, str) or not message:
        message = f"The upstream answered HTTP {status}." if status else "The upstream reported an error."
    return message, err


def _anthropic_type_for_status(status: int) -> str:
    return anthropic_error_type(status) if status else "api_error"


def _openai_error_obj(message: str, anthropic_type: str) -> Json:
    kind, code = _OPENAI_ERROR.get(anthropic_type, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _anthropic_error_obj(message: str, err: Json, status: int) -> Json:
    code, kind = err.get("code"), err.get("type")
    mapped = anthropic_error_type(status, code if isinstance(code, str) else None,
                                  kind if isinstance(kind, str) else None)
    return {"type": "error", "error": {"type": mapped, "message": message}}


def anthropic_status_to_openai(status: int) -> int:
    """The HTTP status to give an OpenAI client for an Anthropic one (529 "overloaded" is not OpenAI's)."""
    return 503 if status == 529 else status


def anthropic_error_to_openai(status: int, body: bytes) -> bytes:
    """An Anthropic error response body → an OpenAI one. Only the upstream's message is carried over."""
    message, err = _error_message(body, status)
    kind = err.get("type")
    if not isinstance(kind, str) or kind not in _OPENAI_ERROR:
        kind = _anthropic_type_for_status(status)
    return _dumps(_openai_error_obj(message, kind))


def openai_error_to_anthropic(status: int, body: bytes) -> bytes:
    """An OpenAI error response body → an Anthropic one. Only the upstream's message is carried over."""
    message, err = _error_message(body, status)
    return _dumps(_anthropic_error_obj(message, err, status))


"""The bounds on a client's request body, in one place: how it is decoded, re-parsed and re-encoded, and what
the strings the proxy records or echoes may hold.

A body goes through up to three JSON libraries, each with limits of its own: msgspec decodes it at the edge
(nesting bounded by the interpreter's recursion limit, about 1,000 levels; UTF-8 checked only in the fields it
decodes, not in those it keeps as `Raw`), orjson re-parses it when a route needs it rewritten (at most 1,024
levels; refuses invalid UTF-8 and numbers no double can hold) and re-encodes it (at most 254 levels). So that
a request is accepted or refused the same way whichever route serves it, the edge checks what the later
steps would refuse (UTF-8, via a fast ASCII test first), and re-encoding past orjson's depth falls back to
msgspec, whose limit is the edge's own. Every refusal is an `InvalidRequest` (400): never a 500.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

from proxy.errors import InvalidRequest

__all__ = ["MAX_NAME_LENGTH", "check_name", "decode", "dumps", "loads", "recordable"]

# Model names are short identifiers ("gpt-4o-mini", "claude-3-5-sonnet-20241022"); a longer one is no
# model of ours, and would only bloat the records and the error that echoes it.
MAX_NAME_LENGTH = 256

_TOO_DEEP = "The request body is nested too deeply."
_NOT_UTF8 = "The request body is not valid UTF-8 JSON."


def decode(decoder: msgspec.json.Decoder, body: bytes) -> Any:
    """`body` decoded (and so validated) by `decoder`; 400 for anything it or a later re-parse would refuse."""
    try:
        request = decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        param = message.split("`$.", 1)[1].split("`")[0].split("[")[0] if "`$." in message else None
        raise InvalidRequest(f"Invalid request body: {message}", param=param) from None
    except msgspec.DecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest(_TOO_DEEP, code="invalid_json") from None
    if not body.isascii():  # most bodies are ASCII (non-ASCII text is often \u-escaped): no decode at all
        try:
            body.decode()  # msgspec skips `Raw` fields without checking their UTF-8
        except UnicodeDecodeError:
            raise InvalidRequest(_NOT_UTF8, code="invalid_json") from None
    return request


def loads(body: bytes) -> Any:
    """A body the edge accepted, parsed into Python objects to be rewritten."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # Reachable only by what msgspec skips inside `Raw` fields but orjson refuses (a number like 1e400).
        reason = str(exc).split(":", 1)[0]
        raise InvalidRequest(f"The request body is not valid JSON ({reason}).", code="invalid_json") from None


def dumps(obj: Any) -> bytes:
    """`obj` (parsed by `loads`, perhaps rewritten) as JSON bytes."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        # orjson encodes at most 254 levels; msgspec as deep as the edge decoded. Only deep bodies get here.
        try:
            return msgspec.json.encode(obj)
        except RecursionError:
            raise InvalidRequest(_TOO_DEEP, code="invalid_json") from None


def check_name(param: str, value: str, max_length: int = MAX_NAME_LENGTH) -> None:
    """Refuse a name the proxy records (PostgreSQL text cannot hold NUL) or echoes in answers and errors:
    empty, longer than `max_length`, or with control, format or separator characters (NUL, newlines, C1
    controls, zero-width and bidi marks, …). Its value is not repeated in the message."""
    if not value or len(value) > max_length or not value.isprintable():
        raise InvalidRequest(
            f"`{param}` must be 1 to {max_length} printable characters (no control or invisible characters).",
            param=param)


def recordable(value: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """`value` as it may be recorded: at most `max_length` characters, each non-printable one (NUL, which
    PostgreSQL text cannot hold and which would fail the whole COPY batch of request logs, controls, lone
    surrogates from undecodable percent-escapes) replaced by U+FFFD. For values that are not refused, only
    recorded (the path of a 404)."""
    value = value[:max_length]
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else "\ufffd" for c in value)  # surrogates are not printable

"""Which wire format each side of an attempt speaks, and what that changes: the upstream request body and
path, how answers, errors and streams come back, and where usage is read.

Clients speak OpenAI (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`) or Anthropic
(`/v1/messages`); providers speak `openai` or `anthropic`. Same format on both sides: bytes pass through
(only `model` is rewritten, and streams are asked for usage). Different formats: `proxy.translate`.
"""

from __future__ import annotations

import logging
import traceback

import orjson

from proxy import inputs
from proxy.errors import InvalidRequest
from proxy.stream import AnthropicMeter, StreamMeter, sse_error_event
from proxy.translate import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    Pricer,
    TranslationError,
    anthropic_error_to_openai,
    anthropic_status_to_openai,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    openai_error_to_anthropic,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
)
from shared.money import format_usd

__all__ = ["ANTHROPIC", "OPENAI", "client_format", "stream_error", "translate_answer", "upstream_request",
           "with_cost"]

log = logging.getLogger("rocket_relay.proxy")

OPENAI = "openai"
ANTHROPIC = "anthropic"
MESSAGES_PATH = "/v1/messages"
# Endpoints a provider of each format can serve (Anthropic has no completions or embeddings).
SERVES = {OPENAI: frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings", MESSAGES_PATH)),
          ANTHROPIC: frozenset(("/v1/chat/completions", MESSAGES_PATH))}


def client_format(path: str) -> str:
    return ANTHROPIC if path == MESSAGES_PATH else OPENAI


def upstream_request(
    path: str, upstream_format: str, upstream_model: str, body: bytes, parsed: dict | None,
    *, same_model: bool, inject_usage: bool, output_cap: tuple[str, int] | None,
) -> tuple[str, bytes, dict | None]:
    """(upstream path, body, parsed client body for reuse by the next attempt).

    `output_cap`: (field, tokens) to add when the client set no output cap, so the upstream is held to
    what the reservation assumed (`proxy.bounds`)."""
    client = client_format(path)
    if client == upstream_format:
        upstream_path = "/messages" if client == ANTHROPIC else path[3:]  # base URLs end in /v1
        if same_model and not inject_usage and output_cap is None:
            return upstream_path, body, parsed  # pass the client's bytes through untouched
        parsed = parsed if parsed is not None else inputs.loads(body)
        out = {**parsed, "model": upstream_model}
        if inject_usage:
            out["stream_options"] = {**(parsed.get("stream_options") or {}), "include_usage": True}
        if output_cap is not None:
            out[output_cap[0]] = output_cap[1]
        return upstream_path, inputs.dumps(out), parsed
    parsed = parsed if parsed is not None else inputs.loads(body)
    try:
        if upstream_format == ANTHROPIC:
            cap = output_cap[1] if output_cap is not None else 0  # 0: the client set one
            translated = openai_to_anthropic_request(parsed, upstream_model, default_max_tokens=cap)
        else:
            translated = anthropic_to_openai_request(parsed, upstream_model)
    except TranslationError as exc:
        raise InvalidRequest(f"This request cannot be served by the model's provider: {exc}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # The edge checks only the fields the relay reads; the translators walk the rest of the client's
        # JSON (a message that is not an object, `system: 5`, `stop: {}`…), and a value of a shape they
        # don't expect fails on it. That is the client's body, not our failure. Logged (without the body)
        # so that a translator bug on a valid body still shows.
        _log_refused_shape(exc)
        raise InvalidRequest(f"This request cannot be served by the model's provider: the body is not a valid "
                             f"{'OpenAI' if client == OPENAI else 'Anthropic'} request.") from None
    return ("/messages" if upstream_format == ANTHROPIC else "/chat/completions"), inputs.dumps(translated), parsed


def _log_refused_shape(exc: Exception) -> None:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    log.info("translation refused a body: %s at %s:%s", type(exc).__name__, frame.filename, frame.lineno)


_USAGE = b'"usage":{'


def with_cost(answer: bytes, parsed: dict | None, cost_micros: int) -> bytes:
    """The client's JSON answer with the request's cost in its `usage`: `cost_micros` (integer micro-units) and
    `cost` (the same as an exact decimal string of USD, never a float). `parsed`: the answer already parsed, if
    it is (a passthrough answer); an answer without a usage object is returned as it is."""
    fields = b'"cost":"%s","cost_micros":%d,' % (format_usd(cost_micros).encode(), cost_micros)
    # The usual answer (compact JSON, one usage object with fields) takes the two fields in place, unparsed:
    # an unescaped `"usage":{` can only be a key, and the parsed answer's top-level usage is that object.
    at = answer.find(_USAGE)
    if (at > 0 and answer.count(_USAGE) == 1 and answer[at + len(_USAGE):at + len(_USAGE) + 1] == b'"'
            and (parsed is None or isinstance(parsed.get("usage"), dict))):
        at += len(_USAGE)
        return answer[:at] + fields + answer[at:]
    if parsed is None:
        try:
            parsed = orjson.loads(answer)
        except orjson.JSONDecodeError:
            return answer
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    if not isinstance(usage, dict):
        return answer
    usage["cost"] = format_usd(cost_micros)
    usage["cost_micros"] = cost_micros
    return inputs.dumps(parsed)


def translate_answer(path: str, upstream_format: str, status: int, answer: bytes,
                     model: str) -> tuple[int, bytes, dict | None]:
    """(status, body for the client, the upstream's answer as parsed JSON or None)."""
    client = client_format(path)
    try:
        parsed = orjson.loads(answer)
    except orjson.JSONDecodeError:
        parsed = None
    if client == upstream_format:
        return status, answer, parsed if isinstance(parsed, dict) else None
    if status != 200:
        if upstream_format == ANTHROPIC:
            return anthropic_status_to_openai(status), anthropic_error_to_openai(status, answer), None
        return status, openai_error_to_anthropic(status, answer), None
    if not isinstance(parsed, dict):
        raise TranslationError("the upstream answer is not a JSON object")
    try:
        if upstream_format == ANTHROPIC:
            return status, orjson.dumps(anthropic_to_openai_response(parsed, model)), parsed
        return status, orjson.dumps(openai_to_anthropic_response(parsed, model)), parsed
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # An answer of a shape the translator does not expect: the upstream's fault (502), not ours (500).
        _log_refused_shape(exc)
        raise TranslationError("the upstream answer has an unexpected shape") from None


def stream_transformer(path: str, upstream_format: str, model: str, *, inject_usage: bool, client_usage: bool,
                       pricer: Pricer | None = None):
    """The object a stream's bytes pass through: `feed`, `finish`, `.upstream_usage`, `.model`. `pricer` puts
    the request's cost into the usage the client receives (its last usage event)."""
    client = client_format(path)
    if client == upstream_format:
        meter = StreamMeter(drop_usage_chunk=inject_usage) if client == OPENAI else AnthropicMeter()
    elif upstream_format == ANTHROPIC:
        meter = AnthropicToOpenAIStream(model, client_usage)
    else:
        meter = OpenAIToAnthropicStream(model)
    meter.pricer = pricer
    return meter


def stream_error(path: str, message: str, code: str) -> bytes:
    """The last event of a stream that broke after bytes were sent, in the client's format."""
    if client_format(path) == ANTHROPIC:
        body = orjson.dumps({"type": "error", "error": {"type": "api_error", "message": message}})
        return b"event: error\ndata: " + body + b"\n\n"
    return sse_error_event(message, code)

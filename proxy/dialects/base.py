"""The shape every dialect has, and the pieces pass-through and translating dialects share.

A dialect is stateless and built once (module constants); per attempt the relay calls `request` (the
upstream path and body), then `answer` (a whole body) or `stream` (an object that turns the upstream's SSE
bytes into the client's and reads the usage), and `usage` (the upstream's usage object → `Usage`, by the one
normaliser in `shared.usage`).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from proxy import inputs
from proxy.errors import InvalidRequest
from proxy.translate import TranslationError
from shared.money import format_usd
from shared.usage import Usage, normalise

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.routing import Route
    from proxy.stream import StreamTransformer

__all__ = ["Dialect", "answer_with_cost", "client_body", "parse_answer", "rewritten", "translated_answer",
           "translated_request"]

log = logging.getLogger("rocket_relay.proxy")


class Dialect:
    """One client dialect × one upstream dialect (see the module docstring)."""

    __slots__ = ()
    upstream = "openai"  # the upstream's dialect: how its usage reads, which credential header it takes
    passthrough = True  # the upstream answers in the client's dialect (its bytes go through as they are)
    path = "/chat/completions"  # the upstream path (base URLs end in /v1)

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        """(upstream path, body) of one attempt at `route` (`byok`: with the org's own credential)."""
        raise NotImplementedError

    def answer(self, status: int, raw: bytes, model: str) -> tuple[int, bytes, dict | None]:
        """(status, body for the client, the upstream's answer as a JSON object or None)."""
        return status, raw, parse_answer(raw)

    def stream(self, ex: Exchange) -> StreamTransformer:
        raise NotImplementedError

    def usage(self, usage: Any, service_tier: Any = None) -> Usage | None:
        return normalise(self.upstream, usage, service_tier)


def parse_answer(raw: bytes) -> dict | None:
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


_USAGE = b'"usage":{'


def answer_with_cost(answer: bytes, parsed: dict | None, cost_micros: int) -> bytes:
    """The client's JSON answer with the request's cost in its `usage`: `cost_micros` (integer micro-units) and
    `cost` (the same as an exact decimal string of USD, never a float). `parsed`: the answer already parsed, if
    it is (a passthrough answer); an answer without a usage object is returned as it is."""
    fields = b'"cost":"%s","cost_micros":%d,' % (format_usd(cost_micros).encode(), cost_micros)
    # The usual answer (compact JSON, one usage object with fields) takes the two fields in place, unparsed
    # (re-encoding it cost ~1.5 % of a request): an unescaped `"usage":{` can only be a key.
    at = answer.find(_USAGE)
    if (at > 0 and answer.count(_USAGE) == 1 and answer[at + len(_USAGE):at + len(_USAGE) + 1] == b'"'
            and (parsed is None or isinstance(parsed.get("usage"), dict))):
        at += len(_USAGE)
        return answer[:at] + fields + answer[at:]
    if parsed is None:
        parsed = parse_answer(answer)
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    if not isinstance(usage, dict):
        return answer
    usage["cost"] = format_usd(cost_micros)
    usage["cost_micros"] = cost_micros
    return inputs.dumps(parsed)


def rewritten(ex: Exchange, route: Route, extra: dict | None = None) -> bytes:
    """The client's body for a pass-through attempt: its own bytes when nothing changes, else re-encoded with
    the route's model name, the output cap the reservation assumed, without the relay's own fields (`models`,
    `provider`), and with `extra` fields set."""
    bound = ex.bound
    forward = bound.forward if bound is not None else None
    if route.upstream_model == ex.model and forward is None and not ex.strip and not extra:
        return ex.body  # pass the client's bytes through untouched
    out = {**ex.loads(), "model": route.upstream_model}
    for name in ex.strip:
        out.pop(name, None)
    if forward is not None:
        out[forward[0]] = forward[1]
    if extra:
        out.update(extra)
    return inputs.dumps(out)


def client_body(ex: Exchange) -> dict:
    """The client's parsed body without the relay's own fields: what a translator reads."""
    parsed = ex.loads()
    if ex.strip:
        parsed = {k: v for k, v in parsed.items() if k not in ex.strip}
    return parsed


def translated_request(ex: Exchange, client: str, translate: Callable[[dict], dict]) -> bytes:
    """`translate(client body)` encoded; what a translator refuses is a 400, never a 500."""
    try:
        return inputs.dumps(translate(client_body(ex)))
    except TranslationError as exc:
        raise InvalidRequest(f"This request cannot be served by the model's provider: {exc}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # The edge checks only the fields the relay reads; the translators walk the rest of the client's
        # JSON (a message that is not an object, `system: 5`, `stop: {}`…), and a value of a shape they
        # don't expect fails on it. That is the client's body, not our failure. Logged (without the body)
        # so that a translator bug on a valid body still shows.
        _log_refused_shape(exc)
        raise InvalidRequest(f"This request cannot be served by the model's provider: the body is not a valid "
                             f"{client} request.") from None


def translated_answer(raw: bytes, translate: Callable[[dict], dict]) -> tuple[bytes, dict]:
    """(client body, upstream answer) of a 200 answer in the other dialect; TranslationError (502) when the
    upstream's answer is not of the shape its dialect promises."""
    parsed = parse_answer(raw)
    if parsed is None:
        raise TranslationError("the upstream answer is not a JSON object")
    try:
        return orjson.dumps(translate(parsed)), parsed
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # An answer of a shape the translator does not expect: the upstream's fault (502), not ours (500).
        _log_refused_shape(exc)
        raise TranslationError("the upstream answer has an unexpected shape") from None


def _log_refused_shape(exc: Exception) -> None:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    log.info("translation refused a body: %s at %s:%s", type(exc).__name__, frame.filename, frame.lineno)

"""OpenAI Responses API clients (`/v1/responses`): passed through to providers that serve it (`openai` providers
with `responses_api`), translated to Chat Completions for other OpenAI-format providers and, through Chat
Completions, to Anthropic Messages (`proxy.translate.responses`).

Stored state: a response stored by a provider lives in the provider account that created it. With the relay's
own credential that account is shared by every org, so one org could read (or continue, through
`previous_response_id`) another's; so with the relay's credentials a pass-through request is sent with
`store: false` and stateful fields are refused, and stored responses are read or deleted only with the org's
own (BYOK) credential (`proxy.handlers.stored_response`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from proxy.dialects.base import Dialect, rewritten, translated_answer, translated_request
from proxy.errors import InvalidRequest
from proxy.sse import SSEBuffer, data_of
from proxy.translate import (
    AnthropicToOpenAIStream,
    Pricer,
    anthropic_error_to_openai,
    anthropic_status_to_openai,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
    with_cost,
)
from proxy.translate.responses import ChatToResponsesStream, chat_to_responses_response, responses_to_chat_request

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.routing import Route

__all__ = ["PASSTHROUGH", "VIA_ANTHROPIC", "VIA_CHAT", "ResponsesMeter"]

_STATEFUL = ("previous_response_id", "conversation")
_FINAL = (b"response.completed", b"response.incomplete", b"response.failed")


class ResponsesMeter:
    """Passes a Responses API stream through, reading the model and usage of its last `response.*` event
    (adding the request's cost to that usage) and counting its deltas; other events are not parsed."""

    __slots__ = ("_sse", "events", "model", "pricer", "service_tier", "usage")

    def __init__(self) -> None:
        self._sse = SSEBuffer()
        self.events = 0
        self.model: str | None = None
        self.usage: dict | None = None
        self.service_tier: object = None
        self.pricer: Pricer | None = None

    @property
    def upstream_usage(self) -> dict | None:
        return self.usage

    def feed(self, chunk: bytes) -> bytes:
        complete = self._sse.take(chunk)
        if not complete:
            return b""
        self.events += complete.count(b".delta")
        if any(name in complete for name in _FINAL):
            return self._inspect(complete)
        return complete

    def finish(self) -> bytes:
        tail = self._sse.rest()
        return self._inspect(tail) if tail.strip() else tail

    def _inspect(self, complete: bytes) -> bytes:
        events = complete.replace(b"\r\n", b"\n").split(b"\n\n")
        changed = False
        for i, ev in enumerate(events):
            payload = data_of(ev)
            if payload is None or not any(name in payload for name in _FINAL):
                continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            response = obj.get("response") if isinstance(obj, dict) else None
            if not isinstance(response, dict):
                continue
            if isinstance(response.get("model"), str):
                self.model = response["model"]
            self.service_tier = response.get("service_tier")
            usage = response.get("usage")
            if isinstance(usage, dict):
                self.usage = usage
                if self.pricer is not None:
                    response["usage"] = with_cost(usage, self.pricer, usage)
                    name = obj.get("type") if isinstance(obj.get("type"), str) else "response.completed"
                    events[i] = b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj)
                    changed = True
        return b"\n\n".join(events) if changed else complete


class ResponsesPassthrough(Dialect):
    """The client's bytes to a provider that serves the Responses API (see the module docstring on state)."""

    __slots__ = ()
    path = "/responses"

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        if byok:
            return self.path, rewritten(ex, route)
        parsed = ex.loads()
        for name in _STATEFUL:
            if parsed.get(name):
                raise InvalidRequest(f"`{name}` is available only with your organization's own (BYOK) credential "
                                     "for a provider that stores responses.", param=name,
                                     code="stored_responses_unavailable")
        return self.path, rewritten(ex, route, {"store": False})

    def stream(self, ex: Exchange) -> ResponsesMeter:
        return ResponsesMeter()


def _cap(ex: Exchange) -> int:
    bound = ex.bound
    return bound.forward[1] if bound is not None and bound.forward is not None else 0


class ResponsesViaChat(Dialect):
    """Responses translated to Chat Completions and back."""

    __slots__ = ()
    passthrough = False
    path = "/chat/completions"

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        return self.path, translated_request(ex, "Responses API", lambda body: responses_to_chat_request(
            body, route.upstream_model, default_max_tokens=_cap(ex)))

    def answer(self, status: int, raw: bytes, model: str) -> tuple[int, bytes, dict | None]:
        if status != 200:
            return status, raw, None  # both OpenAI's error shape
        body, parsed = translated_answer(raw, lambda answer: chat_to_responses_response(answer, model))
        return status, body, parsed

    def stream(self, ex: Exchange) -> ChatToResponsesStream:
        return ChatToResponsesStream(ex.model)


class ResponsesViaAnthropic(Dialect):
    """Responses translated to Chat Completions, then to Anthropic Messages; and back the same way."""

    __slots__ = ()
    upstream = "anthropic"
    passthrough = False
    path = "/messages"

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        cap = _cap(ex)

        def translate(body: dict) -> dict:
            chat = responses_to_chat_request(body, route.upstream_model, default_max_tokens=cap)
            return openai_to_anthropic_request(chat, route.upstream_model, default_max_tokens=cap)

        return self.path, translated_request(ex, "Responses API", translate)

    def answer(self, status: int, raw: bytes, model: str) -> tuple[int, bytes, dict | None]:
        if status != 200:
            return anthropic_status_to_openai(status), anthropic_error_to_openai(status, raw), None
        body, parsed = translated_answer(raw, lambda answer: chat_to_responses_response(
            anthropic_to_openai_response(answer, model), model))
        return status, body, parsed

    def stream(self, ex: Exchange) -> ChatToResponsesStream:
        return ChatToResponsesStream(ex.model, inner=AnthropicToOpenAIStream(ex.model, True))


PASSTHROUGH = ResponsesPassthrough()
VIA_CHAT = ResponsesViaChat()
VIA_ANTHROPIC = ResponsesViaAnthropic()

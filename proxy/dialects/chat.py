"""OpenAI Chat Completions clients: passed through to OpenAI-format providers, translated for Anthropic ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.dialects.base import Dialect, rewritten, translated_answer, translated_request
from proxy.stream import StreamMeter
from proxy.translate import (
    AnthropicToOpenAIStream,
    anthropic_error_to_openai,
    anthropic_status_to_openai,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
)

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.routing import Route

__all__ = ["PASSTHROUGH", "VIA_ANTHROPIC", "OpenAIPassthrough"]

_INCLUDE_USAGE = {"include_usage": True}


class OpenAIPassthrough(Dialect):
    """The client's bytes to an OpenAI-format provider. A stream is asked for its usage even when the client
    did not ask for it (to meter it), and that chunk is hidden from the client."""

    __slots__ = ()

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        if ex.stream and not ex.client_usage:
            options = ex.loads().get("stream_options")
            return self.path, rewritten(ex, route, {"stream_options": {
                **(options if isinstance(options, dict) else {}), **_INCLUDE_USAGE}})
        return self.path, rewritten(ex, route)

    def stream(self, ex: Exchange) -> StreamMeter:
        return StreamMeter(drop_usage_chunk=not ex.client_usage)


class _ChatPassthrough(OpenAIPassthrough):
    __slots__ = ()
    path = "/chat/completions"


class ChatViaAnthropic(Dialect):
    """Chat Completions translated to Anthropic Messages and back (`proxy.translate`)."""

    __slots__ = ()
    upstream = "anthropic"
    passthrough = False
    path = "/messages"

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        bound = ex.bound
        cap = bound.forward[1] if bound is not None and bound.forward is not None else 0  # 0: the client set one
        return self.path, translated_request(ex, "OpenAI", lambda body: openai_to_anthropic_request(
            body, route.upstream_model, default_max_tokens=cap))

    def answer(self, status: int, raw: bytes, model: str) -> tuple[int, bytes, dict | None]:
        if status != 200:
            return anthropic_status_to_openai(status), anthropic_error_to_openai(status, raw), None
        body, parsed = translated_answer(raw, lambda answer: anthropic_to_openai_response(answer, model))
        return status, body, parsed

    def stream(self, ex: Exchange) -> AnthropicToOpenAIStream:
        return AnthropicToOpenAIStream(ex.model, ex.client_usage)


PASSTHROUGH = _ChatPassthrough()
VIA_ANTHROPIC = ChatViaAnthropic()

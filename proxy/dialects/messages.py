"""Anthropic Messages clients: passed through to Anthropic providers, translated for OpenAI-format ones;
and `messages/count_tokens`, which only Anthropic providers answer (estimated for the others)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.dialects.base import Dialect, rewritten, translated_answer, translated_request
from proxy.stream import AnthropicMeter
from proxy.translate import (
    OpenAIToAnthropicStream,
    anthropic_to_openai_request,
    openai_error_to_anthropic,
    openai_to_anthropic_response,
)

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.routing import Route

__all__ = ["COUNT_TOKENS", "PASSTHROUGH", "VIA_CHAT"]


class MessagesPassthrough(Dialect):
    """The client's bytes to an Anthropic provider: thinking blocks and their signatures, cache_control,
    `context_management`, `output_config` and every other field go as they are (only `model` is rewritten)."""

    __slots__ = ()
    upstream = "anthropic"
    path = "/messages"

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        return self.path, rewritten(ex, route)

    def stream(self, ex: Exchange) -> AnthropicMeter:
        return AnthropicMeter()


class MessagesViaChat(Dialect):
    """Messages translated to Chat Completions and back (`proxy.translate`)."""

    __slots__ = ()
    passthrough = False
    path = "/chat/completions"

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        return self.path, translated_request(ex, "Anthropic", lambda body: anthropic_to_openai_request(
            body, route.upstream_model))

    def answer(self, status: int, raw: bytes, model: str) -> tuple[int, bytes, dict | None]:
        if status != 200:
            return status, openai_error_to_anthropic(status, raw), None
        body, parsed = translated_answer(raw, lambda answer: openai_to_anthropic_response(answer, model))
        return status, body, parsed

    def stream(self, ex: Exchange) -> OpenAIToAnthropicStream:
        return OpenAIToAnthropicStream(ex.model)


class CountTokens(Dialect):
    """`messages/count_tokens` passed through to an Anthropic provider (`proxy.handlers.count_tokens` estimates
    it for the others)."""

    __slots__ = ()
    upstream = "anthropic"
    path = "/messages/count_tokens"

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        return self.path, rewritten(ex, route)


PASSTHROUGH = MessagesPassthrough()
VIA_CHAT = MessagesViaChat()
COUNT_TOKENS = CountTokens()

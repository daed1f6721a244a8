"""OpenAI's legacy completions and embeddings: passed through to OpenAI-format providers only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.dialects.base import rewritten
from proxy.dialects.chat import OpenAIPassthrough

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.routing import Route

__all__ = ["COMPLETIONS", "EMBEDDINGS"]


class _Completions(OpenAIPassthrough):
    __slots__ = ()
    path = "/completions"


class _Embeddings(OpenAIPassthrough):
    __slots__ = ()
    path = "/embeddings"

    def request(self, ex: Exchange, route: Route, byok: bool) -> tuple[str, bytes]:
        return self.path, rewritten(ex, route)  # never streamed


COMPLETIONS = _Completions()
EMBEDDINGS = _Embeddings()

"""The proxy's endpoints, in one table: everything about a route in one object, as Starlette's `Route`.

An `Endpoint` says which path and methods it answers, which handler serves it, how its body is decoded
(decoding is validation: a `msgspec` Struct of the fields the relay reads, the rest passes through), which
model kinds it serves, which dialect its clients speak (how errors reach them), which `Dialect` serves it for
each upstream dialect (`proxy.dialects`), and how its output is counted for the reservation
(`proxy.bounds`). Adding an endpoint is one entry here, plus a dialect module when it speaks a new dialect.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from proxy import handlers, inputs, relay
from proxy.dialects import chat, legacy, messages, responses
from proxy.dialects.base import Dialect
from proxy.errors import ANTHROPIC_ERRORS, OPENAI_ERRORS, RESPONSES_ERRORS, ErrorCatalogue

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.routing import Route

__all__ = ["ENDPOINTS", "Endpoint", "Output", "endpoint_for", "match"]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
ServiceTier = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_]{1,32}$(?!\n)")]
ProviderName = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
ProviderNames = Annotated[list[ProviderName], msgspec.Meta(max_length=32)]
MAX_FALLBACK_MODELS = 8


# ---- request bodies: what the relay reads of each ------------------------------------------------------------

class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ProviderPreferences(msgspec.Struct, forbid_unknown_fields=True):
    """OpenRouter-style `provider` routing controls (see `proxy.routing.apply_preferences`)."""

    order: ProviderNames | None = None
    only: ProviderNames | None = None
    ignore: ProviderNames | None = None
    allow_fallbacks: bool = True
    sort: Literal["price", "latency", "throughput"] | None = None


class Routed(msgspec.Struct, kw_only=True):
    """The routing controls every model endpoint accepts; the relay's own, never sent upstream."""

    models: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_FALLBACK_MODELS)] | None = None
    provider: ProviderPreferences | None = None


class ChatBody(Routed):
    model: str
    messages: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1)]
    stream: bool = False
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    n: PositiveInt | None = None
    stream_options: StreamOptions | None = None
    service_tier: ServiceTier | None = None  # what the client asked for; the answer says what was billed


class CompletionBody(Routed):
    model: str
    prompt: msgspec.Raw
    stream: bool = False
    max_tokens: PositiveInt | None = None
    n: PositiveInt | None = None
    best_of: PositiveInt | None = None
    stream_options: StreamOptions | None = None


class EmbeddingBody(Routed):
    model: str
    input: str | list[msgspec.Raw]


class MessagesBody(Routed):
    """Anthropic Messages API request (what we read of it; the rest passes through)."""

    model: str
    messages: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt
    stream: bool = False


class CountTokensBody(msgspec.Struct):
    """Anthropic's `messages/count_tokens`: a Messages request without the output cap."""

    model: str
    messages: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1)]


class ResponsesBody(Routed):
    """OpenAI Responses API request. `background` cannot be billed by a relay that settles when the answer
    ends, so it is refused; `n` does not exist there."""

    model: str
    stream: bool = False
    max_output_tokens: PositiveInt | None = None
    service_tier: ServiceTier | None = None
    background: Literal[False] = False


# ---- how output is counted ------------------------------------------------------------------------------------

class Output:
    """How an endpoint's output is bounded: the cap fields it reads (the largest set one bounds it), the field
    the relay forwards its cap in when the client set none (None: the body must carry one), that field's
    default (None: `RR_DEFAULT_MAX_OUTPUT_TOKENS`), the fields that multiply output (`n`, `best_of`) and
    whether image references count towards the prompt bound."""

    __slots__ = ("cap_fields", "choices", "default_cap", "forward", "images")

    def __init__(self, cap_fields: tuple[str, ...], *, forward: str | None, default_cap: int | None = None,
                 choices: tuple[str, ...] = (), images: bool = True) -> None:
        if forward is not None and forward not in cap_fields:
            raise ValueError(f"the forwarded cap field {forward!r} is not one of the cap fields")
        self.cap_fields = cap_fields
        self.forward = forward
        self.default_cap = default_cap
        self.choices = choices
        self.images = images


# ---- endpoints --------------------------------------------------------------------------------------------------

Handler = Callable[["Exchange"], Awaitable[None]]


class Endpoint:
    """One route of the proxy (see the module docstring). `path` may end in `{id}`: one path segment."""

    __slots__ = ("_decoder", "client", "dialects", "handler", "kinds", "methods", "output", "path", "prefix")

    def __init__(self, path: str, handler: Handler, *, methods: tuple[str, ...] = ("POST",),
                 body: type | None = None, kinds: tuple[str, ...] = (), client: ErrorCatalogue = OPENAI_ERRORS,
                 dialects: dict[str, Dialect] | None = None, output: Output | None = None) -> None:
        if body is not None and not kinds:
            raise ValueError(f"{path}: an endpoint with a model body must name the model kinds it serves")
        self.path = path
        self.prefix = path[:-4] if path.endswith("{id}") else None
        self.handler = handler
        self.methods = methods
        self._decoder = msgspec.json.Decoder(body) if body is not None else None
        self.kinds = kinds
        self.client = client
        self.dialects = dialects or {}
        self.output = output

    def decode(self, body: bytes) -> Any:
        """The body decoded (so validated); 400 for a bad one, and for a bad model name or fallback list."""
        assert self._decoder is not None, f"{self.path} takes no body"
        request = inputs.decode(self._decoder, body)
        inputs.check_name("model", request.model)
        for name in getattr(request, "models", None) or ():
            inputs.check_name("models", name)
        return request

    def dialect_for(self, route: Route) -> Dialect | None:
        """The dialect this endpoint is served in by `route`: for the richest dialect the provider speaks
        (`Route.wire`), else for its base format; None when the route cannot serve it."""
        dialects = self.dialects
        return dialects.get(route.wire) or dialects.get(route.api_format)

    def dialect_for_format(self, api_format: str) -> Dialect:
        """The dialect for a provider of `api_format` (the base format only; for tests and probes)."""
        return self.dialects[api_format]

    @property
    def allow(self) -> bytes:
        return ", ".join(self.methods).encode()


_CHAT_OUTPUT = Output(("max_completion_tokens", "max_tokens"), forward="max_completion_tokens", choices=("n",))

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/v1/chat/completions", relay.serve_model, body=ChatBody, kinds=("chat",),
             dialects={"openai": chat.PASSTHROUGH, "anthropic": chat.VIA_ANTHROPIC}, output=_CHAT_OUTPUT),
    Endpoint("/v1/completions", relay.serve_model, body=CompletionBody, kinds=("completion", "chat"),
             dialects={"openai": legacy.COMPLETIONS},
             # OpenAI's own default for the legacy endpoint: forwarding it keeps answers as clients expect.
             output=Output(("max_tokens",), forward="max_tokens", default_cap=16, choices=("n", "best_of"),
                           images=False)),
    Endpoint("/v1/embeddings", relay.serve_model, body=EmbeddingBody, kinds=("embedding",),
             dialects={"openai": legacy.EMBEDDINGS}),
    Endpoint("/v1/messages", relay.serve_model, body=MessagesBody, kinds=("chat",), client=ANTHROPIC_ERRORS,
             dialects={"anthropic": messages.PASSTHROUGH, "openai": messages.VIA_CHAT},
             output=Output(("max_tokens",), forward=None)),
    Endpoint("/v1/messages/count_tokens", handlers.count_tokens, body=CountTokensBody, kinds=("chat",),
             client=ANTHROPIC_ERRORS, dialects={"anthropic": messages.COUNT_TOKENS, "openai": messages.COUNT_TOKENS}),
    Endpoint("/v1/responses", relay.serve_model, body=ResponsesBody, kinds=("chat",), client=RESPONSES_ERRORS,
             dialects={"openai-responses": responses.PASSTHROUGH, "openai": responses.VIA_CHAT,
                       "anthropic": responses.VIA_ANTHROPIC},
             output=Output(("max_output_tokens",), forward="max_output_tokens")),
    Endpoint("/v1/responses/{id}", handlers.stored_response, methods=("GET", "DELETE"), client=RESPONSES_ERRORS,
             dialects={"openai-responses": responses.PASSTHROUGH}),
    Endpoint("/v1/models", handlers.models, methods=("GET",)),
    Endpoint("/v1/generations/{id}", handlers.generation, methods=("GET",)),
)

_EXACT = {e.path: e for e in ENDPOINTS if e.prefix is None}
_PREFIXED = tuple((e.prefix, e) for e in ENDPOINTS if e.prefix is not None)
if len(_EXACT) + len(_PREFIXED) != len(ENDPOINTS):
    raise RuntimeError("two endpoints share a path")


def match(path: str) -> tuple[Endpoint, str | None] | None:
    """(endpoint, its `{id}` or None) for a request path; None for an unknown path."""
    endpoint = _EXACT.get(path)
    if endpoint is not None:
        return endpoint, None
    for prefix, endpoint in _PREFIXED:
        if path.startswith(prefix):
            param = path[len(prefix):]
            if param and "/" not in param:
                return endpoint, param
    return None


def endpoint_for(path: str) -> Endpoint:
    """The endpoint of an exact path (KeyError if none): for tests and the probe runner."""
    return _EXACT[path]

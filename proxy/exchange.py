"""One request's exchange: what the relay knows about it as it moves along, in one object instead of the long
argument lists it used to be passed around in.

Built by `proxy.app` for every request (the ASGI callables, the endpoint, the parsed headers, the record);
filled in by the handler: the body and its decoded struct, the reservation, the model and price of the
attempt in progress, and what the upstream produced (for billing, and for the cost on the answer).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec

from proxy import inputs
from proxy.errors import InvalidRequest
from proxy.estimate import SENT_KEPT
from proxy.http import Receive, RequestHeaders, Scope, Send
from proxy.records import RequestRecord
from proxy.upstream import anthropic_headers, openai_headers
from shared.money import version_cost_micros
from shared.usage import Usage

if TYPE_CHECKING:
    from proxy.billing import Reservation
    from proxy.bounds import Bound
    from proxy.dialects.base import Dialect
    from proxy.endpoints import Endpoint
    from proxy.state import ProxyState
    from shared.money import PriceVersion

__all__ = ["Exchange", "forwarded_header"]

# The client headers forwarded upstream (README "Headers"): each to the providers of one format only, and only
# when its value is a list of visible-ASCII tokens. Everything else a client sends stays here (hop-by-hop
# headers included: the upstream request's head is our own).
_BETA = re.compile(r"[A-Za-z0-9._:=-]{1,128}(?:[ \t]*,[ \t]*[A-Za-z0-9._:=-]{1,128}){0,31}")
_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")


def forwarded_header(name: str, value: str | None, pattern: re.Pattern[str]) -> str | None:
    """`value` if it may be forwarded upstream; 400 naming the header if it may not."""
    if value is None:
        return None
    value = value.strip()
    if not pattern.fullmatch(value):
        raise InvalidRequest(f"The `{name}` header must be a comma-separated list of tokens (letters, digits and "
                             "`._:=-`).", param=name, code="invalid_header")
    return value


class Exchange:
    """One request (see the module docstring)."""

    __slots__ = (
        "_priced",
        "_upstream_headers",
        "answer_bytes",
        "billable",
        "body",
        "bound",
        "client_usage",
        "content_events",
        "dialect",
        "endpoint",
        "headers",
        "model",
        "out_headers",
        "param",
        "parsed",
        "price",
        "rec",
        "receive",
        "request",
        "requested_tier",
        "reservation",
        "scope",
        "send",
        "sent",
        "state",
        "stream_done",
        "strip",
    )

    def __init__(self, state: ProxyState | None, endpoint: Endpoint, scope: Scope | None, receive: Receive | None,
                 send: Send | None, headers: RequestHeaders | None, rec: RequestRecord | None,
                 out_headers: list[tuple[bytes, bytes]], param: str | None = None) -> None:
        self.state = state
        self.endpoint = endpoint
        self.scope = scope
        self.receive = receive
        self.send = send
        self.headers = headers
        self.rec = rec
        self.out_headers = out_headers
        self.param = param  # the `{id}` of the path, for endpoints that have one
        self.body = b""
        self.request: Any = None
        self.parsed: dict | None = None  # the client's body as Python objects, once an attempt needed it
        self.model = ""  # the model the client asked for (the name its answer reports)
        self.strip: tuple[str, ...] = ()  # the relay's own fields, removed before the body goes upstream
        self.bound: Bound | None = None
        self.reservation: Reservation | None = None
        self.price: PriceVersion | None = None  # the price of the model being tried (`models` fallbacks)
        self.dialect: Dialect | None = None  # the dialect of the attempt in progress
        self.requested_tier: str | None = None
        self.client_usage = False  # an OpenAI stream whose client asked for its usage chunk
        self.billable = False  # true once an answer (or part of a stream) went to the client
        self.content_events = 0
        self.answer_bytes = 0
        self.stream_done = False  # a stream's last event of a whole answer went to the client
        self.sent: list[bytes] = []  # a stream's first SENT_KEPT bytes: what an estimate counts if it is cut
        self._upstream_headers: dict[str, bytes] | None = None
        self._priced: tuple | None = None  # (usage, byok, price, result): priced once for the answer and the event

    @classmethod
    def for_body(cls, endpoint: Endpoint, body: bytes, model: str) -> Exchange:
        """An exchange of a body alone, outside a client request (the probe runner sends its own)."""
        ex = cls(None, endpoint, None, None, None, None, None, [])
        ex.body = body
        ex.model = model
        return ex

    def loads(self) -> dict:
        """The client's body parsed (once per request, however many attempts rewrite it)."""
        if self.parsed is None:
            self.parsed = inputs.loads(self.body)
        return self.parsed

    @property
    def stream(self) -> bool:
        return bool(getattr(self.request, "stream", False))

    def upstream_headers(self, api_format: str) -> bytes:
        """The header lines for a provider of `api_format`: its constant ones plus the client's forwarded
        ones (`anthropic-version`, `anthropic-beta` to Anthropic; `OpenAI-Beta` to OpenAI), checked here and
        again by `proxy.h1` before they are written."""
        cached = self._upstream_headers
        if cached is None:
            headers = self.headers
            raw = headers.forwarded_raw if headers is not None else None
            if not raw:  # the common case: nothing to forward
                self._upstream_headers = cached = {"anthropic": anthropic_headers(None, None),
                                                   "openai": openai_headers(None)}
            else:
                version = forwarded_header("anthropic-version", raw.get(b"anthropic-version"), _VERSION)
                beta = forwarded_header("anthropic-beta", raw.get(b"anthropic-beta"), _BETA)
                openai_beta = forwarded_header("openai-beta", raw.get(b"openai-beta"), _BETA)
                self._upstream_headers = cached = {"anthropic": anthropic_headers(version, beta),
                                                   "openai": openai_headers(openai_beta)}
        return cached[api_format]

    # ---- what was produced, and what it costs ----------------------------------------------------------------

    def keep(self, out: bytes) -> None:
        if self.answer_bytes < SENT_KEPT:
            self.sent.append(out)  # a reference to bytes sent anyway: no copy
        self.answer_bytes += len(out)

    def price_usage(self, usage: Usage, byok: bool) -> tuple[int, int, int]:
        """(charged, uncharged, price row id): the cost of `usage` at the price of the model that served it,
        never more than the reservation (what the balance, credit limit and spend cap allowed)."""
        priced = self._priced
        if priced is not None and priced[0] is usage and priced[1] == byok and priced[2] is self.price:
            return priced[3]  # the answer carried this figure already; the event charges the same one
        given = usage
        if usage.service_tier is None and self.requested_tier is not None:
            usage = msgspec.structs.replace(usage, service_tier=self.requested_tier)
        assert self.price is not None and self.reservation is not None
        cost, row = version_cost_micros(self.price, usage, byok=byok)
        charged = min(cost, self.reservation.amount)
        result = charged, cost - charged, row.id
        self._priced = (given, byok, self.price, result)
        return result

    def price_upstream_usage(self, upstream_usage: dict) -> int:
        """The charge for a stream's usage in the upstream's dialect: the cost its last usage event carries."""
        assert self.dialect is not None and self.rec is not None
        usage = self.dialect.usage(upstream_usage) or Usage()
        return self.price_usage(usage, self.rec.byok)[0]

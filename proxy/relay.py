"""One model request's journey: parse → authenticate → route → forward (with failover) → answer → record.

Everything here runs per request, so it is written to be read top to bottom and to do no avoidable work:
the body is decoded once into a typed struct (decoding is validation), re-encoded only when the upstream
needs something changed, and passed through as bytes otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated

import msgspec

from proxy import inputs
from proxy.billing import Reservation
from proxy.bounds import Bound, request_bound
from proxy.errors import ByokRejected, InvalidRequest, ModelUnavailable, UpstreamError
from proxy.estimate import SENT_KEPT, estimate_usage
from proxy.formats import (
    OPENAI,
    SERVES,
    client_format,
    stream_error,
    stream_transformer,
    translate_answer,
    upstream_request,
    with_cost,
)
from proxy.http import Receive, RequestHeaders, Scope, Send, send_response
from proxy.records import RequestRecord
from proxy.routing import Attempt, ModelEntry, Route, plan_attempts
from proxy.stream import StreamTransformer
from proxy.translate import Pricer, TranslationError
from proxy.upstream import UpstreamResponse
from shared.billing import UsageEvent
from shared.money import version_cost_micros
from shared.usage import Usage, normalise

if TYPE_CHECKING:
    from proxy.app import ProxyState

__all__ = ["is_model_path", "relay"]

log = logging.getLogger("rocket_relay.relay")


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
ServiceTier = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_]{1,32}$(?!\n)")]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatBody(msgspec.Struct):
    model: str
    messages: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1)]
    stream: bool = False
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    n: PositiveInt | None = None
    stream_options: StreamOptions | None = None
    service_tier: ServiceTier | None = None  # what the client asked for; the answer says what was billed


class CompletionBody(msgspec.Struct):
    model: str
    prompt: msgspec.Raw
    stream: bool = False
    max_tokens: PositiveInt | None = None
    n: PositiveInt | None = None
    best_of: PositiveInt | None = None
    stream_options: StreamOptions | None = None


class EmbeddingBody(msgspec.Struct):
    model: str
    input: str | list[msgspec.Raw]


class MessagesBody(msgspec.Struct):
    """Anthropic Messages API request (what we read of it; the rest passes through)."""

    model: str
    messages: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1)]
    max_tokens: PositiveInt
    stream: bool = False


Body = ChatBody | CompletionBody | EmbeddingBody | MessagesBody

_DECODERS = {
    "/v1/chat/completions": msgspec.json.Decoder(ChatBody),
    "/v1/completions": msgspec.json.Decoder(CompletionBody),
    "/v1/embeddings": msgspec.json.Decoder(EmbeddingBody),
    "/v1/messages": msgspec.json.Decoder(MessagesBody),
}
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


def _decode(path: str, body: bytes) -> Body:
    request = inputs.decode(_DECODERS[path], body)
    inputs.check_name("model", request.model)
    return request


async def relay(state: ProxyState, path: str, scope: Scope, receive: Receive, send: Send,
                headers: RequestHeaders, rec: RequestRecord, out_headers: list[tuple[bytes, bytes]]) -> None:
    """Serve one POST to a model endpoint; raises ProxyError for anything answered with an error."""
    key = await state.auth.authenticate(headers.api_key)
    rec.org_id = key.org_id
    rec.api_key_id = key.key_id
    body = await state.bodies.read(receive, headers.content_length, rec.client_ip)
    request = _decode(path, body)
    rec.model = request.model[:200]
    stream = getattr(request, "stream", False)
    rec.stream = stream
    entry = state.catalogue.entry_for(request.model, path, key)
    price = entry.price_at(rec.started_wall)
    if price is None:
        raise ModelUnavailable(f"The model `{request.model}` has no price configured.", param="model")
    bound = request_bound(path, request, body, state.settings)
    reservation = await state.biller.reserve(key, rec.request_id, price, bound.prompt_tokens, bound.output_tokens,
                                             rec.started_wall, out_headers)
    produced = Produced(reservation, getattr(request, "service_tier", None))
    try:
        await _forward(state, entry, path, body, request, stream, bound, receive, send, rec, out_headers, produced)
    finally:
        if produced.billable and rec.usage is None:  # a stream cut short before its usage: estimate it
            try:
                rec.usage = await asyncio.to_thread(estimate_usage, body, produced.sent, produced.answer_bytes,
                                                    rec.upstream_model or request.model)
            except Exception:  # never let an estimate stand between a request and its settlement
                log.exception("usage estimate of %s failed; using bytes / 4", rec.request_id)
            rec.estimated = True
        event = _usage_event(rec, reservation, produced, len(body))
        rec.cost_micros = await state.biller.settle(
            reservation, event, (event.prompt_tokens + event.completion_tokens) if event else 0)


class Produced:
    """What the upstream delivered, and how it is priced: for billing, and for the cost on the answer."""

    __slots__ = ("_priced", "answer_bytes", "billable", "content_events", "requested_tier", "reservation", "sent")

    def __init__(self, reservation: Reservation, requested_tier: str | None) -> None:
        self.reservation = reservation
        self.requested_tier = requested_tier
        self.billable = False  # true once an answer (or part of a stream) went to the client
        self.content_events = 0
        self.answer_bytes = 0
        self.sent: list[bytes] = []  # a stream's first SENT_KEPT bytes: what an estimate counts if it is cut
        self._priced: tuple[Usage, bool, tuple[int, int, int]] | None = None  # the answer's and the event's

    def keep(self, out: bytes) -> None:
        if self.answer_bytes < SENT_KEPT:
            self.sent.append(out)  # a reference to bytes sent anyway: no copy
        self.answer_bytes += len(out)

    def price(self, usage: Usage, byok: bool) -> tuple[int, int, int]:
        """(charged, uncharged, price row id): the cost of `usage`, never more than the reservation (what the
        balance, credit limit and spend cap allowed when the request was accepted)."""
        priced = self._priced
        if priced is not None and priced[0] is usage and priced[1] == byok:
            return priced[2]  # the answer carried this figure already; the event charges the same one
        given = usage
        if usage.service_tier is None and self.requested_tier is not None:
            usage = msgspec.structs.replace(usage, service_tier=self.requested_tier)
        cost, row = version_cost_micros(self.reservation.price, usage, byok=byok)
        charged = min(cost, self.reservation.amount)
        result = charged, cost - charged, row.id
        self._priced = (given, byok, result)
        return result


def _usage_event(rec: RequestRecord, res: Reservation, produced: Produced, body_bytes: int) -> UsageEvent | None:
    """The billed usage of a finished request, or None when nothing billable was produced."""
    if not produced.billable:
        return None
    usage = rec.usage
    if usage is None:  # no usage from upstream (a stream cut short): the documented estimate
        usage = Usage(input=-(-body_bytes // 4), output=produced.content_events or -(-produced.answer_bytes // 4),
                      estimated=True)
        rec.usage = usage
        rec.estimated = True
    rec.prompt_tokens, rec.completion_tokens = usage.prompt_total, usage.completion_total
    charged, uncharged, price_id = produced.price(usage, rec.byok)
    if uncharged:  # an upstream that ignored the cap: the excess is not charged, and is on record
        log.warning("request %s: usage (%d prompt, %d completion tokens) exceeds its reservation; %d µ$ uncharged",
                    rec.request_id, usage.prompt_total, usage.completion_total, uncharged)
    return UsageEvent(
        request_id=rec.request_id, created_us=res.started_us, org_id=res.org_id, api_key_id=res.key_id,
        model=rec.model or "", provider=rec.provider, route_id=rec.route_id, prompt_tokens=usage.prompt_total,
        completion_tokens=usage.completion_total, cost_micros=charged, price_id=price_id, byok=rec.byok,
        uncharged_micros=uncharged, cached_input_tokens=usage.cached_input,
        cache_write_5m_tokens=usage.cache_write_5m, cache_write_1h_tokens=usage.cache_write_1h,
        reasoning_tokens=usage.reasoning, input_image_tokens=usage.input_image, input_audio_tokens=usage.input_audio,
        output_image_tokens=usage.output_image, output_audio_tokens=usage.output_audio,
        service_tier=usage.service_tier or produced.requested_tier, estimated=usage.estimated,
    )


async def _forward(state: ProxyState, entry: ModelEntry, path: str, body: bytes, request: Body, stream: bool,
                   bound: Bound, receive: Receive, send: Send, rec: RequestRecord,
                   out_headers: list[tuple[bytes, bytes]], produced: Produced) -> None:
    # OpenAI streams: ask the upstream for usage even when the client did not, and hide that chunk from it.
    options = getattr(request, "stream_options", None)
    client_usage = stream and options is not None and options.include_usage
    attempts = [a for a in plan_attempts(entry, await state.byok.for_org(rec.org_id), state.breakers,
                                         time.monotonic(), state.settings.max_attempts)
                if path in SERVES[a.route.api_format]]
    if not attempts:
        raise InvalidRequest(f"The model `{entry.name}` cannot be used with {path}.", param="model",
                             code="model_not_supported")
    def pricer(upstream_usage: dict) -> int:  # the cost a stream's last usage event carries to the client
        usage = normalise(rec.provider_format, upstream_usage) or Usage()
        return produced.price(usage, rec.byok)[0]

    opened = await _open_upstream(state, attempts, path, body, request.model, stream, client_usage, bound, rec,
                                  pricer)
    route = opened.route

    if opened.meter is None:  # a whole answer (or an error), already read
        raw = opened.raw
        rec.mark_first_byte()
        try:
            status, answer, parsed = translate_answer(path, route.api_format, opened.status, raw, request.model)
        except TranslationError:
            raise UpstreamError(f"The upstream provider {route.provider} sent an answer that could not be read.",
                                retryable=False) from None
        if status == 200:
            if parsed is not None:
                model = parsed.get("model")
                rec.reported_model = inputs.recordable(model) if isinstance(model, str) else None
                rec.usage = normalise(route.api_format, parsed.get("usage"), parsed.get("service_tier"))
            produced.billable = True
            produced.answer_bytes = len(raw)
            if rec.usage is not None:  # the cost goes on the answer (settlement charges the same figure)
                charged = produced.price(rec.usage, rec.byok)[0]
                answer = with_cost(answer, parsed if answer is raw else None, charged)
                out_headers.append((b"x-rr-cost-micros", b"%d" % charged))
        else:
            rec.error_code = "upstream_rejected_request"
        rec.status_code = status
        content_type = opened.content_type.encode() if route.api_format == client_format(path) else b"application/json"
        await send_response(send, status, answer, out_headers, content_type)
        return
    rec.status_code = 200
    produced.billable = True
    try:
        await _relay_stream(opened, receive, send, rec, out_headers, state.settings.max_request_duration_s, path,
                            produced)
    finally:
        produced.content_events = getattr(opened.meter, "events", 0)


class Opened:
    """An attempt's answer far enough in to commit to: a non-streamed body read whole, or a stream whose
    first bytes for the client are in hand. Until then a failure is invisible to the client, so it fails over."""

    __slots__ = ("chunks", "content_type", "first", "meter", "raw", "resp", "route", "status")

    def __init__(self, route: Route, resp: UpstreamResponse, raw: bytes = b"", meter: StreamTransformer | None = None,
                 chunks: AsyncIterator[bytes] | None = None, first: bytes = b"") -> None:
        self.route = route
        self.resp = resp
        self.status = resp.status
        self.content_type = resp.content_type
        self.raw = raw
        self.meter = meter
        self.chunks = chunks
        self.first = first


async def _open_upstream(state: ProxyState, attempts: list[Attempt], path: str, body: bytes, model: str,
                         stream: bool, client_usage: bool, bound: Bound, rec: RequestRecord,
                         pricer: Pricer) -> Opened:
    """Try the planned routes in order until one answers. Only failures before any byte reached the client
    get here, so failing over is invisible to it; the failover budget bounds the whole search."""
    parsed: dict | None = None
    last_error: UpstreamError | None = None
    breakers = state.breakers
    deadline = rec.started + state.settings.failover_budget_s
    client = client_format(path)
    for attempt in attempts:
        route = attempt.route
        rec.attempts += 1
        rec.provider, rec.route_id, rec.upstream_model, rec.byok = (route.provider, route.id, route.upstream_model,
                                                                    attempt.byok)
        rec.provider_format = route.api_format
        rec.route_status = route.probe_status
        inject_usage = stream and not client_usage and route.api_format == OPENAI == client
        upstream_path, payload, parsed = upstream_request(
            path, route.api_format, route.upstream_model, body, parsed, same_model=route.upstream_model == model,
            inject_usage=inject_usage, output_cap=bound.forward)
        now = time.monotonic()
        breakers.attempt(route.id, now)
        try:
            resp = await state.upstream.send(route, upstream_path, payload, attempt.credential)
            opened = await _commit(route, resp, path, model, stream, inject_usage, client_usage, pricer)
        except UpstreamError as exc:
            last_error = exc
            if attempt.byok and exc.code in ("upstream_auth_failed", "upstream_credential_unusable"):
                # The org's own key was refused (or cannot be sent): say so, and never fall back to ours.
                if exc.code == "upstream_auth_failed":
                    raise ByokRejected(f"The provider {route.provider} rejected your organization's BYOK "
                                       "credential; update it in the portal.") from None
                raise ByokRejected(f"Your organization's BYOK credential for {route.provider} holds characters "
                                   "that cannot be sent in an HTTP header; update it in the portal.",
                                   code="byok_credential_unusable") from None
            if exc.status != 429:
                breakers.failure(route.id, time.monotonic())
            if not exc.retryable or time.perf_counter() > deadline:
                raise
            continue
        breakers.success(route.id)
        return opened
    assert last_error is not None
    raise last_error


async def _commit(route: Route, resp: UpstreamResponse, path: str, model: str, stream: bool, inject_usage: bool,
                  client_usage: bool, pricer: Pricer) -> Opened:
    """Read an answer until it can no longer fail over: the whole body, or a stream's first client bytes."""
    if resp.status != 200 or not stream:
        return Opened(route, resp, await resp.read())
    meter = stream_transformer(path, route.api_format, model, inject_usage=inject_usage, client_usage=client_usage,
                               pricer=pricer)
    chunks = resp.chunks()
    first = b""
    try:
        async for chunk in chunks:  # left suspended on `break`: the pump goes on from here
            first = meter.feed(chunk)
            if first:
                break
    except UpstreamError:
        resp.close()
        raise
    return Opened(route, resp, meter=meter, chunks=chunks, first=first)


async def _relay_stream(opened: Opened, receive: Receive, send: Send, rec: RequestRecord,
                        out_headers: list[tuple[bytes, bytes]], max_duration_s: float, path: str,
                        produced: Produced) -> None:
    meter, resp = opened.meter, opened.resp
    assert meter is not None and opened.chunks is not None
    await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *out_headers]})
    pump = asyncio.ensure_future(_pump(opened.chunks, opened.first, send, rec, meter, path, produced))
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((pump, watcher), timeout=max_duration_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not pump.done():
            # The client went away (or the stream outlived its reservation): stop reading upstream now,
            # so the provider stops generating, and charge what was produced.
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            if watcher.done():
                rec.status_code, rec.error_code = 499, "client_cancelled"
            else:
                rec.error_code = "max_duration_exceeded"
                await _end_stream_quietly(send, stream_error(path, "The stream exceeded the maximum duration.",
                                                             "max_duration_exceeded"))
        watcher.cancel()
        resp.close()
        # What the upstream says it ran: recorded, so made recordable (an upstream is not trusted either).
        rec.reported_model = inputs.recordable(meter.model) if isinstance(meter.model, str) else None
        rec.usage = normalise(opened.route.api_format, meter.upstream_usage, getattr(meter, "service_tier", None))
    if not pump.cancelled() and pump.exception() is not None:
        raise pump.exception()  # an unexpected bug: let the app's error handler log it


async def _pump(chunks: AsyncIterator[bytes], first: bytes, send: Send, rec: RequestRecord,
                meter: StreamTransformer, path: str, produced: Produced) -> None:
    try:
        if first:
            rec.mark_first_byte()
            produced.keep(first)
            await send({"type": "http.response.body", "body": first, "more_body": True})
        async for chunk in chunks:
            out = meter.feed(chunk)
            if out:
                rec.mark_first_byte()
                produced.keep(out)
                await send({"type": "http.response.body", "body": out, "more_body": True})
        tail = meter.finish()
    except UpstreamError as exc:
        # Bytes are already out, so the status can't change: end with an error event instead.
        rec.error_code = "upstream_stream_broken"
        rec.status_code = exc.status
        tail = meter.finish() + stream_error(path, exc.message, exc.code or "upstream_error")
    except OSError:
        rec.status_code, rec.error_code = 499, "client_cancelled"
        return
    await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _end_stream_quietly(send: Send, body: bytes) -> None:
    try:
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except Exception:  # the client is gone already
        pass


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def is_model_path(path: str) -> bool:
    return path in _DECODERS



"""One model request's journey: parse → authenticate → reserve → route → forward (with failover) → answer →
settle → record.

Everything here runs per request, so it is written to be read top to bottom and to do no avoidable work:
the body is decoded once into a typed struct (decoding is validation), re-encoded only when the upstream
needs something changed, and passed through as bytes otherwise. What differs between endpoints is in their
`proxy.endpoints.Endpoint`, and what differs between the dialects of an attempt in its `Dialect`; the
request's state travels in one `proxy.exchange.Exchange`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from proxy import inputs
from proxy.bounds import request_bound
from proxy.dialects.base import answer_with_cost, parse_answer
from proxy.errors import ByokRejected, InvalidRequest, ModelUnavailable, UpstreamError
from proxy.estimate import estimate_usage
from proxy.http import Receive, Send, send_response
from proxy.routing import Attempt, ModelEntry, Route, apply_preferences, plan_attempts
from proxy.translate import TranslationError
from proxy.upstream import UpstreamResponse
from shared.billing import UsageEvent
from shared.money import PriceVersion
from shared.usage import Usage

if TYPE_CHECKING:
    from proxy.dialects.base import Dialect
    from proxy.exchange import Exchange
    from proxy.stream import StreamTransformer
    from shared.apikeys import KeyRecord

__all__ = ["candidates", "is_context_length_error", "serve_model"]

log = logging.getLogger("rocket_relay.relay")

_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
_ROUTING_FIELDS = ("models", "provider")
# How providers say a prompt does not fit the model's context (OpenAI's code; Anthropic's and others' text).
_CONTEXT_MARKERS = (b"context_length_exceeded", b"prompt is too long", b"maximum context length",
                    b"context window", b"too many tokens")


async def serve_model(ex: Exchange) -> None:
    """Serve one POST to a model endpoint; raises ProxyError for anything answered with an error."""
    state, rec = ex.state, ex.rec
    assert state is not None and rec is not None and ex.headers is not None and ex.receive is not None
    key = await state.auth.authenticate(ex.headers.api_key)
    rec.org_id = key.org_id
    rec.api_key_id = key.key_id
    ex.body = body = await state.bodies.read(ex.receive, ex.headers.content_length, rec.client_ip)
    ex.request = request = ex.endpoint.decode(body)
    ex.model = request.model
    rec.model = request.model[:200]
    rec.stream = ex.stream
    options = getattr(request, "stream_options", None)
    ex.client_usage = ex.stream and options is not None and options.include_usage
    ex.requested_tier = getattr(request, "service_tier", None)
    if getattr(request, "models", None) is not None or getattr(request, "provider", None) is not None:
        ex.strip = _ROUTING_FIELDS
    models = candidates(ex, key)
    ex.price = models[0][1]
    ex.bound = bound = request_bound(ex.endpoint, request, body, state.settings)
    ex.reservation = reservation = await state.biller.reserve(
        key, rec.request_id, [price for _, price in models], bound.prompt_tokens, bound.output_tokens,
        rec.started_wall, ex.out_headers)
    try:
        await _forward(ex, models)
    finally:
        if ex.billable and rec.usage is None:  # a stream cut short before its usage: estimate it
            try:
                rec.usage = await asyncio.to_thread(estimate_usage, body, ex.sent, ex.answer_bytes,
                                                    rec.upstream_model or request.model)
            except Exception:  # never let an estimate stand between a request and its settlement
                log.exception("usage estimate of %s failed; using bytes / 4", rec.request_id,
                              extra={"request_id": rec.request_id})
            rec.estimated = True
        event = _usage_event(ex)
        rec.cost_micros = await state.biller.settle(
            reservation, event, (event.prompt_tokens + event.completion_tokens) if event else 0)
        if event is not None and rec.route_id is not None and rec.ttfb_ms is not None and rec.status_code == 200:
            state.route_stats.observe(rec.route_id, rec.ttfb_ms / 1000, event.completion_tokens,
                                      time.perf_counter() - rec.started)


def candidates(ex: Exchange, key: KeyRecord) -> list[tuple[ModelEntry, PriceVersion]]:
    """The models to try, in order, each with the price in force: `model`, then the client's `models`
    fallbacks (each billed at its own price; the reservation covers the dearest)."""
    assert ex.state is not None and ex.rec is not None
    names = [ex.model]
    for name in getattr(ex.request, "models", None) or ():
        if name not in names:
            names.append(name)
    out = []
    for name in names:
        entry = ex.state.catalogue.entry_for(name, ex.endpoint.path, ex.endpoint.kinds, key)
        price = entry.price_at(ex.rec.started_wall)
        if price is None:
            raise ModelUnavailable(f"The model `{name}` has no price configured.", param="model")
        out.append((entry, price))
    return out


def _usage_event(ex: Exchange) -> UsageEvent | None:
    """The billed usage of a finished request, or None when nothing billable was produced."""
    rec, res = ex.rec, ex.reservation
    assert rec is not None and res is not None
    if not ex.billable:
        return None
    usage = rec.usage
    if usage is None:  # no usage from upstream (a stream cut short): the documented estimate
        usage = Usage(input=-(-len(ex.body) // 4), output=ex.content_events or -(-ex.answer_bytes // 4),
                      estimated=True)
        rec.usage = usage
        rec.estimated = True
    rec.prompt_tokens, rec.completion_tokens = usage.prompt_total, usage.completion_total
    charged, uncharged, price_id = ex.price_usage(usage, rec.byok)
    if uncharged:  # an upstream that ignored the cap: the excess is not charged, and is on record
        log.warning("request %s: usage (%d prompt, %d completion tokens) exceeds its reservation; %d µ$ uncharged",
                    rec.request_id, usage.prompt_total, usage.completion_total, uncharged,
                    extra={"request_id": rec.request_id})
    return UsageEvent(
        request_id=rec.request_id, created_us=res.started_us, org_id=res.org_id, api_key_id=res.key_id,
        model=rec.model or "", provider=rec.provider, route_id=rec.route_id, prompt_tokens=usage.prompt_total,
        completion_tokens=usage.completion_total, cost_micros=charged, price_id=price_id, byok=rec.byok,
        uncharged_micros=uncharged, cached_input_tokens=usage.cached_input,
        cache_write_5m_tokens=usage.cache_write_5m, cache_write_1h_tokens=usage.cache_write_1h,
        reasoning_tokens=usage.reasoning, input_image_tokens=usage.input_image, input_audio_tokens=usage.input_audio,
        output_image_tokens=usage.output_image, output_audio_tokens=usage.output_audio,
        service_tier=usage.service_tier or ex.requested_tier, estimated=usage.estimated,
    )


class Planned:
    """One attempt: a route of one of the candidate models, with its dialect."""

    __slots__ = ("attempt", "dialect", "entry", "price")

    def __init__(self, attempt: Attempt, dialect: Dialect, entry: ModelEntry, price: PriceVersion) -> None:
        self.attempt = attempt
        self.dialect = dialect
        self.entry = entry
        self.price = price


async def _plan(ex: Exchange, models: list[tuple[ModelEntry, PriceVersion]]) -> list[Planned]:
    state, rec, endpoint = ex.state, ex.rec, ex.endpoint
    assert state is not None and rec is not None
    byok = await state.byok.for_org(rec.org_id)
    prefs = getattr(ex.request, "provider", None)
    limit = state.settings.max_attempts
    now = time.monotonic()
    planned: list[Planned] = []
    unavailable: UpstreamError | None = None
    for entry, price in models:
        try:
            attempts = plan_attempts(entry, byok, state.breakers, now, len(entry.routes) if prefs else limit)
        except UpstreamError as exc:  # every route of this model is failing: the next model may serve
            unavailable = unavailable or exc
            continue
        if prefs is not None:
            attempts = apply_preferences(attempts, prefs, state.route_stats)[:limit]
        for attempt in attempts:
            dialect = endpoint.dialect_for(attempt.route)
            if dialect is not None:
                planned.append(Planned(attempt, dialect, entry, price))
    if prefs is not None and prefs.sort == "price" and len(models) > 1:
        planned.sort(key=lambda p: (p.price.base.input_micros_per_mtok + p.price.base.output_micros_per_mtok))
    if not planned:
        if unavailable is not None:
            raise unavailable
        if prefs is not None:
            raise InvalidRequest("No provider of the requested models matches your `provider` preferences.",
                                 param="provider", code="no_matching_provider")
        raise InvalidRequest(f"The model `{ex.model}` cannot be used with {endpoint.path}.", param="model",
                             code="model_not_supported")
    return planned


async def _forward(ex: Exchange, models: list[tuple[ModelEntry, PriceVersion]]) -> None:
    rec, send = ex.rec, ex.send
    assert rec is not None and send is not None and ex.state is not None
    opened = await _open_upstream(ex, await _plan(ex, models))
    route, dialect = opened.route, opened.dialect

    if opened.meter is None:  # a whole answer (or an error), already read
        raw = opened.raw
        rec.mark_first_byte()
        try:
            status, answer, parsed = dialect.answer(opened.status, raw, ex.model)
        except TranslationError:
            raise UpstreamError(f"The upstream provider {route.provider} sent an answer that could not be read.",
                                retryable=False) from None
        if status == 200:
            if parsed is not None:
                model = parsed.get("model")
                rec.reported_model = inputs.recordable(model) if isinstance(model, str) else None
                rec.usage = dialect.usage(parsed.get("usage"), parsed.get("service_tier"))
            ex.billable = True
            ex.answer_bytes = len(raw)
            if rec.usage is not None:  # the cost goes on the answer (settlement charges the same figure)
                charged = ex.price_usage(rec.usage, rec.byok)[0]
                answer = answer_with_cost(answer, parsed if answer is raw else None, charged)
                ex.out_headers.append((b"x-rr-cost-micros", b"%d" % charged))
        else:
            rec.error_code = "upstream_rejected_request"
        rec.status_code = status
        content_type = opened.content_type.encode() if dialect.passthrough else b"application/json"
        await send_response(send, status, answer, ex.out_headers, content_type)
        return
    rec.status_code = 200
    ex.billable = True
    try:
        await _relay_stream(ex, opened)
    finally:
        ex.content_events = getattr(opened.meter, "events", 0)


class Opened:
    """An attempt's answer far enough in to commit to: a non-streamed body read whole, or a stream whose
    first bytes for the client are in hand. Until then a failure is invisible to the client, so it fails over."""

    __slots__ = ("chunks", "content_type", "dialect", "first", "meter", "raw", "resp", "route", "status")

    def __init__(self, route: Route, dialect: Dialect, resp: UpstreamResponse, raw: bytes = b"",
                 meter: StreamTransformer | None = None, chunks: AsyncIterator[bytes] | None = None,
                 first: bytes = b"") -> None:
        self.route = route
        self.dialect = dialect
        self.resp = resp
        self.status = resp.status
        self.content_type = resp.content_type
        self.raw = raw
        self.meter = meter
        self.chunks = chunks
        self.first = first


def is_context_length_error(status: int, raw: bytes) -> bool:
    """True for an upstream's 400 saying the prompt does not fit the model's context window."""
    if status not in (400, 413):
        return False
    lowered = raw[:4096].lower()
    return any(marker in lowered for marker in _CONTEXT_MARKERS)


async def _open_upstream(ex: Exchange, planned: list[Planned]) -> Opened:
    """Try the planned routes in order until one answers. Only failures before any byte reached the client
    get here, so failing over is invisible to it; the failover budget bounds the whole search. A prompt too
    long for one model's context goes on to the next candidate model, if the client named one."""
    state, rec = ex.state, ex.rec
    assert state is not None and rec is not None
    last_error: UpstreamError | None = None
    breakers, metrics = state.breakers, state.metrics
    deadline = rec.started + state.settings.failover_budget_s
    skip_model: str | None = None
    for i, plan in enumerate(planned):
        attempt, dialect, entry = plan.attempt, plan.dialect, plan.entry
        if entry.name == skip_model:
            continue
        route = attempt.route
        rec.attempts += 1
        rec.provider, rec.route_id, rec.upstream_model, rec.byok = (route.provider, route.id, route.upstream_model,
                                                                    attempt.byok)
        rec.provider_format = route.api_format
        rec.route_status = route.probe_status
        rec.model = entry.name[:200]  # a fallback model is billed, and recorded, as itself
        ex.price, ex.dialect = plan.price, dialect
        upstream_path, payload = dialect.request(ex, route, attempt.byok)
        breakers.attempt(route.id, time.monotonic())
        try:
            resp = await state.upstream.send(route, upstream_path, payload, attempt.credential,
                                             ex.upstream_headers(route.api_format))
            opened = await _commit(ex, route, dialect, resp)
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
            metrics.attempts.inc((route.provider, exc.code or "upstream_error"))
            if not exc.retryable or time.perf_counter() > deadline or i == len(planned) - 1:
                raise
            metrics.failovers.inc((route.provider,))
            continue
        breakers.success(route.id)
        metrics.attempts.inc((route.provider, "ok"))
        if (opened.meter is None and is_context_length_error(opened.status, opened.raw)
                and any(p.entry.name != entry.name for p in planned[i + 1:])):
            skip_model = entry.name  # the next model may have a longer context: the client listed it
            metrics.failovers.inc((route.provider,))
            continue
        return opened
    assert last_error is not None
    raise last_error


async def _commit(ex: Exchange, route: Route, dialect: Dialect, resp: UpstreamResponse) -> Opened:
    """Read an answer until it can no longer fail over: the whole body, or a stream's first client bytes."""
    if resp.status != 200 or not ex.stream:
        raw = await resp.read()
        if resp.status == 200 and parse_answer(raw) is None:
            # A 200 whose body is not a JSON object is a broken answer (a proxy's error page, a truncated
            # body): relayed, the client would get garbage and be billed an estimate. Another route may answer.
            resp.close()
            raise UpstreamError(f"The upstream provider {route.provider} sent a 200 answer that is not JSON.")
        return Opened(route, dialect, resp, raw)
    meter = dialect.stream(ex)
    meter.pricer = ex.price_upstream_usage  # the client's last usage event carries the request's cost
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
    if not first:  # the stream ended before one whole event (not SSE at all): nothing is committed yet
        resp.close()
        raise UpstreamError(f"The upstream provider {route.provider} ended its stream before its first event.")
    return Opened(route, dialect, resp, meter=meter, chunks=chunks, first=first)


async def _relay_stream(ex: Exchange, opened: Opened) -> None:
    meter, resp, rec, send = opened.meter, opened.resp, ex.rec, ex.send
    assert meter is not None and opened.chunks is not None and rec is not None and send is not None
    assert ex.receive is not None and ex.state is not None
    await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, *ex.out_headers]})
    pump = asyncio.ensure_future(_pump(ex, opened.chunks, opened.first, meter))
    watcher = asyncio.ensure_future(_wait_for_disconnect(ex.receive))
    try:
        await asyncio.wait((pump, watcher), timeout=ex.state.settings.max_request_duration_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not pump.done():
            # The client went away (or the stream outlived its reservation): stop reading upstream now,
            # so the provider stops generating, and charge what was produced.
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
            if watcher.done():  # the client left: cancelled, unless the whole answer was already out
                if not ex.stream_done:
                    rec.status_code, rec.error_code = 499, "client_cancelled"
            else:
                rec.error_code = "max_duration_exceeded"
                await _end_stream_quietly(send, ex.endpoint.client.sse("The stream exceeded the maximum duration.",
                                                                       "max_duration_exceeded"))
        watcher.cancel()
        resp.close()
        # What the upstream says it ran: recorded, so made recordable (an upstream is not trusted either).
        rec.reported_model = inputs.recordable(meter.model) if isinstance(meter.model, str) else None
        rec.usage = opened.dialect.usage(meter.upstream_usage, getattr(meter, "service_tier", None))
    if not pump.cancelled() and pump.exception() is not None:
        raise pump.exception()  # an unexpected bug: let the app's error handler log it


async def _pump(ex: Exchange, chunks: AsyncIterator[bytes], first: bytes, meter: StreamTransformer) -> None:
    rec, send = ex.rec, ex.send
    assert rec is not None and send is not None
    ends = ex.endpoint.client.stream_end
    try:
        if first:
            rec.mark_first_byte()
            ex.keep(first)
            await send({"type": "http.response.body", "body": first, "more_body": True})
            ex.stream_done = any(end in first for end in ends)
        async for chunk in chunks:
            out = meter.feed(chunk)
            if out:
                rec.mark_first_byte()
                ex.keep(out)
                await send({"type": "http.response.body", "body": out, "more_body": True})
                # A client may leave as soon as the last event is in, before the upstream ends the stream.
                ex.stream_done = ex.stream_done or any(end in out for end in ends)
        tail = meter.finish()
    except UpstreamError as exc:
        # Bytes are already out, so the status can't change: end with an error event instead.
        rec.error_code = "upstream_stream_broken"
        rec.status_code = exc.status
        tail = meter.finish() + ex.endpoint.client.sse(exc.message, exc.code or "upstream_error")
    except OSError:
        if not ex.stream_done:
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

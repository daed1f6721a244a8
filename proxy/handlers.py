"""The endpoints off the billed path: the model list, a request's generation record, Anthropic's
`messages/count_tokens` and stored Responses API objects. None of them is billed."""

from __future__ import annotations

import asyncio
import re
import time
from typing import TYPE_CHECKING

import orjson

from proxy.dialects.base import parse_answer
from proxy.errors import NotFound, UpstreamError
from proxy.estimate import estimate_prompt_tokens
from proxy.http import send_response
from proxy.routing import plan_attempts
from shared.generations import fetch_generation

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.routing import Route

__all__ = ["count_tokens", "generation", "models", "stored_response"]

_RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


async def models(ex: Exchange) -> None:
    state, rec = ex.state, ex.rec
    assert state is not None and rec is not None and ex.headers is not None and ex.send is not None
    key = await state.auth.authenticate(ex.headers.api_key)
    rec.org_id, rec.api_key_id = key.org_id, key.key_id
    data = [{"id": m.name, "object": "model", "created": m.created, "owned_by": m.owned_by}
            for m in state.catalogue.visible_models(key)]
    rec.status_code = 200
    await send_response(ex.send, 200, orjson.dumps({"object": "list", "data": data}), ex.out_headers)


async def generation(ex: Exchange) -> None:
    state, rec = ex.state, ex.rec
    assert state is not None and rec is not None and ex.headers is not None and ex.send is not None
    key = await state.auth.authenticate(ex.headers.api_key)
    rec.org_id, rec.api_key_id = key.org_id, key.key_id
    record = await fetch_generation(state.pool, key.org_id, ex.param or "")
    if record is None:
        raise NotFound("No such generation (records appear a moment after the answer).",
                       code="generation_not_found")
    del record["price_id"]
    rec.status_code = 200
    await send_response(ex.send, 200, orjson.dumps(record), ex.out_headers)


async def count_tokens(ex: Exchange) -> None:
    """Anthropic's `messages/count_tokens`: passed through to the model's Anthropic providers (with the
    client's forwarded headers); for a model without one, estimated (README "count_tokens"): the texts of
    `system`, the messages and the tool definitions counted by the model's tokenizer (`shared.tokenizer`:
    tiktoken for OpenAI-family models, 3.5 characters per token for Claude, 4 otherwise), plus 3 tokens per
    message and 3 to prime the answer, and 765 per image. The estimate's answer carries `x-rr-estimated: true`."""
    state, rec = ex.state, ex.rec
    assert state is not None and rec is not None and ex.headers is not None and ex.send is not None
    assert ex.receive is not None
    key = await state.auth.authenticate(ex.headers.api_key)
    rec.org_id, rec.api_key_id = key.org_id, key.key_id
    ex.body = await state.bodies.read(ex.receive, ex.headers.content_length, rec.client_ip)
    ex.request = ex.endpoint.decode(ex.body)
    ex.model = ex.request.model
    rec.model = ex.model[:200]
    entry = state.catalogue.entry_for(ex.model, ex.endpoint.path, ex.endpoint.kinds, key)
    attempts = plan_attempts(entry, await state.byok.for_org(key.org_id), state.breakers, time.monotonic(),
                             state.settings.max_attempts)
    last_error: UpstreamError | None = None
    for attempt in attempts:
        route = attempt.route
        if route.api_format != "anthropic":
            continue
        rec.provider, rec.route_id, rec.upstream_model, rec.byok = (route.provider, route.id, route.upstream_model,
                                                                    attempt.byok)
        rec.attempts += 1
        path, payload = ex.endpoint.dialect_for_format("anthropic").request(ex, route, attempt.byok)
        try:
            resp = await state.upstream.send(route, path, payload, attempt.credential, ex.upstream_headers("anthropic"))
            raw = await resp.read()
        except UpstreamError as exc:
            last_error = exc
            if not exc.retryable:
                raise
            continue
        rec.status_code = resp.status
        await send_response(ex.send, resp.status, raw, ex.out_headers, resp.content_type.encode())
        return
    if last_error is not None:
        raise last_error
    model = attempts[0].route.upstream_model if attempts else ex.model
    tokens = await asyncio.to_thread(estimate_prompt_tokens, ex.loads(), model)
    rec.status_code = 200
    rec.estimated = True
    await send_response(ex.send, 200, orjson.dumps({"input_tokens": tokens}),
                        [*ex.out_headers, (b"x-rr-estimated", b"true")])


async def stored_response(ex: Exchange) -> None:
    """`GET`/`DELETE /v1/responses/{id}`, passed through with the org's own (BYOK) credential to the providers
    of its models that serve the Responses API (the first that knows the id answers). Responses created with
    the relay's credentials are not stored (`proxy.dialects.responses`), so without BYOK there is nothing to
    read: 404 saying so."""
    state, rec = ex.state, ex.rec
    assert state is not None and rec is not None and ex.headers is not None and ex.send is not None
    key = await state.auth.authenticate(ex.headers.api_key)
    rec.org_id, rec.api_key_id = key.org_id, key.key_id
    response_id = ex.param or ""
    if not _RESPONSE_ID.fullmatch(response_id):
        raise NotFound("No such response.", code="response_not_found")
    byok = await state.byok.for_org(key.org_id)
    providers: dict[int, Route] = {}
    for entry in state.catalogue.visible_models(key):
        for route in entry.routes:
            if route.wire == "openai-responses" and route.provider_id in byok:
                providers.setdefault(route.provider_id, route)
    if not providers:
        raise NotFound("Stored responses are available only through your organization's own (BYOK) credential "
                       "for a provider that serves the Responses API; responses created with the relay's "
                       "credentials are not stored.", code="stored_responses_unavailable")
    method = ex.scope["method"].encode() if ex.scope is not None else b"GET"
    for provider_id, route in providers.items():
        resp = await state.upstream.send(route, f"/responses/{response_id}", b"", byok[provider_id], method=method)
        raw = await resp.read()
        if resp.status == 404:
            continue
        parsed = parse_answer(raw)
        if parsed is not None and isinstance(parsed.get("model"), str):
            rec.model = parsed["model"][:200]
        rec.provider, rec.byok, rec.status_code = route.provider, True, resp.status
        await send_response(ex.send, resp.status, raw, ex.out_headers, resp.content_type.encode())
        return
    raise NotFound("No such response.", code="response_not_found")

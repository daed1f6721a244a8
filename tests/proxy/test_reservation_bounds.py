"""Settlement never exceeds the reservation, by construction, under hostile parameters: output caps are
forwarded when the client sets none, `n`/`best_of` are reserved for, unboundable requests are refused, and an
upstream that ignores the cap leaves the excess uncharged and recorded — at any concurrency."""

from __future__ import annotations

import asyncio
import itertools
import secrets

import httpx
import orjson

from shared.redis_keys import RedisKeys
from tests.conftest import Factory, Server, wait_for_rows
from tests.proxy.test_billing import PRICE, live, pg_money, priced_tenant, wait_usage
from tests.proxy.test_endpoints import CHAT, configure_mock, mock_requests


async def _recorded(mock: Server, model: str) -> list[dict]:
    return [r for r in await mock_requests(mock) if r["model"] == model]


async def test_the_cap_the_reservation_assumed_is_forwarded_when_the_client_sets_none(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, settings,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream)
    chat = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json={"model": t.model, **CHAT})
    streamed = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth,
                                 json={"model": t.model, **CHAT, "stream": True})
    own = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth,
                            json={"model": t.model, **CHAT, "max_tokens": 7})
    legacy = await client.post(proxy.url + "/v1/completions", headers=t.auth, json={"model": t.model, "prompt": "hi"})
    assert [r.status_code for r in (chat, streamed, own, legacy)] == [200] * 4
    seen = [(r["path"], r["max_tokens"], r["max_completion_tokens"]) for r in await _recorded(mock_upstream, t.model)]
    default = settings.default_max_output_tokens
    assert seen == [("/v1/chat/completions", None, default), ("/v1/chat/completions", None, default),
                    ("/v1/chat/completions", 7, None), ("/v1/completions", 16, None)]


async def test_n_and_best_of_are_reserved_for_and_unboundable_requests_are_refused(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, settings,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, balance=10_000)
    body = {"model": t.model, **CHAT, "max_tokens": 100}  # one choice: < 2,000 µ$ prompt bound + 2,000 output
    assert (await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json=body)).status_code == 200
    many = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json={**body, "n": 8})
    assert many.status_code == 402  # 8 × 100 × 20 µ$ of output alone exceeds the balance
    best_of = await client.post(proxy.url + "/v1/completions", headers=t.auth,
                                json={"model": t.model, "prompt": "hi", "max_tokens": 100, "best_of": 8})
    assert best_of.status_code == 402
    for path, extra, param in [
        ("/v1/chat/completions", {"n": settings.max_choices + 1}, "n"),
        ("/v1/completions", {"best_of": settings.max_choices + 1}, "best_of"),
        ("/v1/chat/completions", {"max_tokens": settings.max_output_tokens + 1}, "max_tokens"),
        ("/v1/chat/completions", {"n": 0}, "n"),
        ("/v1/chat/completions", {"max_completion_tokens": 10**30}, "max_completion_tokens"),
    ]:
        payload = {"model": t.model, **({"prompt": "x"} if path == "/v1/completions" else CHAT), **extra}
        resp = await client.post(proxy.url + path, headers=t.auth, json=payload)
        assert resp.status_code == 400, (extra, resp.text)
        assert resp.json()["error"]["param"] == param
    assert len(await _recorded(mock_upstream, t.model)) == 1  # only the first request was forwarded


async def test_an_upstream_ignoring_the_cap_is_charged_no_more_than_the_reservation(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db, redis,
    redis_keys: RedisKeys,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, balance=1_000_000)
    await configure_mock(mock_upstream, {t.model: {"ignore_max_tokens": True, "chunks": 5000}})
    body = orjson.dumps({"model": t.model, **CHAT, "max_tokens": 5, "n": 2})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={**t.auth, "content-type": "application/json"},
                             content=body)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 10_000
    (usage,) = await wait_usage(db, t.org_id, 1)
    reserved = -(-(len(body) * PRICE[0] + 5 * 2 * PRICE[1]) // 1_000_000)  # every body byte a token, + cap × n
    assert usage["cost_micros"] == reserved  # the hold, to the micro
    real = -(-(usage["prompt_tokens"] * PRICE[0] + 10_000 * PRICE[1]) // 1_000_000)
    assert usage["uncharged_micros"] == real - reserved > 0
    await asyncio.sleep(0.1)
    assert await pg_money(db, t.org_id) == (1_000_000 - reserved, 1_000_000 - reserved)
    assert await live(redis, redis_keys, t.org_id) == {"balance": 1_000_000 - reserved, "reserved": 0, "credit": 0}
    log = await wait_for_rows(db, "select cost_micros from request_logs where org_id = $1 and path = $2", t.org_id,
                              "/v1/chat/completions")
    assert log[0]["cost_micros"] == reserved


async def test_hostile_counts_at_concurrency_never_pass_the_credit_limit_or_the_spend_cap(
    proxy: Server, mock_upstream: Server, worker, factory: Factory, db, redis, redis_keys: RedisKeys,
) -> None:
    credit, cap = 5_000, 30_000
    org_id = await factory.org(balance_micros=20_000, credit_limit_micros=credit)
    key_id, key = await factory.key(org_id, monthly_spend_cap_micros=cap)
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(provider_id, price=PRICE)
    await factory.publish_config(proxy, key, model)
    await configure_mock(mock_upstream, {model: {"ignore_max_tokens": True, "chunks": 3000}})
    auth = {"authorization": f"Bearer {key}"}
    shapes = itertools.cycle(itertools.product((1, 3, 16), (1, 20, None), (False, True)))

    async def one(http: httpx.AsyncClient, n: int, max_tokens: int | None, stream: bool) -> httpx.Response:
        body = {"model": model, **CHAT, "n": n, "stream": stream, "user": secrets.token_hex(2)}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return await http.post(proxy.url + "/v1/chat/completions", headers=auth, json=body)

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=50)) as http:
        answers = await asyncio.gather(*(one(http, *next(shapes)) for _ in range(60)))
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 402}, statuses
    billed = statuses.count(200)
    assert billed >= 1
    rows = await wait_usage(db, org_id, billed)
    await asyncio.sleep(0.3)
    assert len(await db.fetch("select 1 from usage_records where org_id = $1", org_id)) == billed
    balance, ledger = await pg_money(db, org_id)
    assert balance == ledger >= -credit
    assert sum(r["cost_micros"] for r in rows if r["api_key_id"] == key_id) <= cap
    assert any(r["uncharged_micros"] > 0 for r in rows)
    assert await live(redis, redis_keys, org_id) == {"balance": balance, "reserved": 0, "credit": credit}

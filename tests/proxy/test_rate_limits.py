"""Rate limits per key and per org (requests and tokens per minute), enforced atomically in Redis."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import Factory, Server
from tests.proxy.test_billing import priced_tenant
from tests.proxy.test_endpoints import CHAT


async def _inside_one_window() -> None:
    """Fixed one-minute windows: don't start a burst in the last seconds of one."""
    into = time.time() % 60
    if into > 50:
        await asyncio.sleep(61 - into)


async def test_key_rpm_lets_exactly_n_through_with_headers(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, rpm_limit=5)
    await _inside_one_window()
    responses = [await client.post(proxy.url + "/v1/chat/completions", headers=t.auth,
                                   json={"model": t.model, **CHAT}) for _ in range(8)]
    assert [r.status_code for r in responses] == [200] * 5 + [429] * 3
    first = responses[0].headers
    assert first["x-ratelimit-limit-requests"] == "5"
    assert first["x-ratelimit-remaining-requests"] == "4"
    assert first["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(first["x-ratelimit-reset-requests"][:-1]) <= 60
    assert responses[4].headers["x-ratelimit-remaining-requests"] == "0"
    refused = responses[5]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_concurrent_burst_lets_exactly_n_through(
    proxy: Server, mock_upstream: Server, factory: Factory,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, rpm_limit=20)
    await _inside_one_window()
    async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=100)) as http:
        responses = await asyncio.gather(*(
            http.post(proxy.url + "/v1/chat/completions", headers=t.auth, json={"model": t.model, **CHAT})
            for _ in range(60)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 20 and statuses.count(429) == 40


async def test_org_limit_holds_across_keys(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream)
    await factory.db.execute("update orgs set rpm_limit = 4 where id = $1", t.org_id)
    _, second = await factory.key(t.org_id)
    _, third = await factory.key(t.org_id)
    await _inside_one_window()
    statuses = []
    for key in (second, third, second, third, second, third):
        resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                 json={"model": t.model, **CHAT})
        statuses.append(resp.status_code)
    assert statuses == [200, 200, 200, 200, 429, 429]


async def test_tokens_per_minute(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server,
                                 factory: Factory) -> None:
    # Each request counts its prompt estimate (bytes / 4) plus max_tokens (100) until settlement corrects it
    # to the real count (8 completion tokens from the mock), so after settlement far more fit.
    t = await priced_tenant(factory, proxy, mock_upstream, tpm_limit=250)
    await _inside_one_window()
    body = {"model": t.model, **CHAT, "max_tokens": 100}
    first = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json=body)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "250"
    remaining = int(first.headers["x-ratelimit-remaining-tokens"])
    assert 100 < remaining < 150
    statuses = [(await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json=body)).status_code
                for _ in range(20)]
    # Settled requests count real tokens (~11 each), so several more pass; then the window is full.
    assert statuses.count(200) >= 5 and statuses[-1] == 429
    refused = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json=body)
    assert refused.json()["error"]["message"].startswith("Rate limit reached: 250 tokens per minute")
    assert refused.headers["x-ratelimit-limit-tokens"] == "250"

"""Money on the hot path: reservations, settlement, the ledger, prices, top-ups — exact to the micro-unit."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from shared.billing import BillingScripts, ExternalIdTaken, apply_ledger_entry, reserve_call
from shared.money import Price, cost_micros, format_usd, parse_usd
from shared.redis_keys import RedisKeys
from tests.conftest import Factory, Server, Tenant, wait_for_rows
from tests.proxy.test_endpoints import CHAT, configure_mock, mock_requests

PRICE = (10_000_000, 20_000_000)  # $10 / $20 per million input / output tokens


async def live(redis, keys: RedisKeys, org_id: int) -> dict[str, int]:
    raw = await redis.hgetall(keys.org(org_id).balance)
    return {k.decode(): int(v) for k, v in raw.items() if k != b"epoch"}


async def settled(redis, keys: RedisKeys, org_id: int, timeout: float = 10.0) -> dict[str, int]:
    """The live balance once the org holds no reservation. The proxy settles after the answer has gone out, so
    right after a response its reservation may still be held (on a cluster, often)."""
    deadline = time.monotonic() + timeout
    while True:
        state = await live(redis, keys, org_id)
        if state["reserved"] == 0 or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.01)


async def pg_money(db, org_id: int) -> tuple[int, int]:
    """(org_balances balance, sum of the org's balance transactions)."""
    row = await db.fetchrow(
        """select b.balance_micros, (select coalesce(sum(amount_micros), 0) from balance_transactions t
                                     where t.org_id = b.org_id)::bigint as ledger
           from org_balances b where b.org_id = $1""", org_id)
    return row["balance_micros"], row["ledger"]


async def wait_usage(db, org_id: int, count: int, timeout: float = 20.0) -> list:
    return await wait_for_rows(db, "select * from usage_records where org_id = $1", org_id, count=count,
                               timeout=timeout)


async def priced_tenant(factory: Factory, proxy: Server, mock: Server, *, balance: int = 100_000_000,
                        price: tuple[int, int] = PRICE, **key_options) -> Tenant:
    org_id = await factory.org(balance_micros=balance)
    key_id, api_key = await factory.key(org_id, **key_options)
    provider_id = await factory.provider(mock.url + "/v1")
    model = await factory.model(provider_id, price=price)
    await factory.publish_config(proxy, api_key, model)
    return Tenant(org_id, key_id, api_key, model, provider_id)


def test_cost_is_exact_integer_arithmetic() -> None:
    price = Price(1, 150_000, 600_000, 0, 0.0)  # $0.15 / $0.60 per Mtok
    assert cost_micros(price, 1_000_000, 0) == 150_000
    assert cost_micros(price, 7, 3) == 3  # 1.05 + 1.8 = 2.85 µ$, rounded up
    assert cost_micros(Price(1, 0, 0, 250, 0.0), 5, 5) == 250
    assert cost_micros(price, 0, 0) == 0
    with pytest.raises(ValueError):
        cost_micros(price, -1, 0)
    assert format_usd(12_345_678) == "12.345678" and format_usd(-5) == "-0.000005"
    assert parse_usd("12.5") == 12_500_000 and parse_usd("0.000001") == 1
    for bad in ("1.0000001", "abc", "1e3"):
        with pytest.raises(ValueError):
            parse_usd(bad)


async def test_request_is_charged_its_real_cost_once(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db, redis,
    redis_keys: RedisKeys,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, balance=5_000_000)
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth,
                             json={"model": t.model, **CHAT, "max_tokens": 5})
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    expected = -(-(usage["prompt_tokens"] * PRICE[0] + usage["completion_tokens"] * PRICE[1]) // 1_000_000)
    (record,) = await wait_usage(db, t.org_id, 1)
    assert record["cost_micros"] == expected
    assert (record["prompt_tokens"], record["completion_tokens"]) == (usage["prompt_tokens"],
                                                                       usage["completion_tokens"])
    assert record["transaction_id"] is not None
    txn = await db.fetchrow("select * from balance_transactions where id = $1", record["transaction_id"])
    assert (txn["kind"], txn["amount_micros"], txn["request_count"]) == ("usage", -expected, 1)
    await asyncio.sleep(0.1)
    assert await pg_money(db, t.org_id) == (5_000_000 - expected, 5_000_000 - expected)
    assert await live(redis, redis_keys, t.org_id) == {"balance": 5_000_000 - expected, "reserved": 0, "credit": 0}
    # Only the chat request's row: publish_config's GET /v1/models requests are logged for the org too (with
    # no cost), and without this filter the first row was whichever the plan happened to read first.
    log = await wait_for_rows(db, "select cost_micros from request_logs where org_id = $1 and path = $2",
                              t.org_id, "/v1/chat/completions")
    assert [r["cost_micros"] for r in log] == [expected]


async def test_insufficient_balance_is_402_and_nothing_is_forwarded(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, balance=100)
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth,
                             json={"model": t.model, **CHAT, "max_tokens": 100})
    assert resp.status_code == 402
    error = resp.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
    assert "0.000100" in error["message"]  # what is available, as exact decimal dollars
    assert not [r for r in await mock_requests(mock_upstream) if r["model"] == t.model]


async def test_credit_limit_lets_an_org_go_that_far_below_zero_and_no_further(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, db,
) -> None:
    org_id = await factory.org(balance_micros=0, credit_limit_micros=50_000)
    _, key = await factory.key(org_id)
    provider_id = await factory.provider(mock_upstream.url + "/v1")
    model = await factory.model(provider_id, price=PRICE)
    await factory.publish_config(proxy, key, model)
    auth = {"authorization": f"Bearer {key}"}
    ok = await client.post(proxy.url + "/v1/chat/completions", headers=auth,
                           json={"model": model, **CHAT, "max_tokens": 100})
    assert ok.status_code == 200
    refused = await client.post(proxy.url + "/v1/chat/completions", headers=auth,
                                json={"model": model, **CHAT, "max_tokens": 5000})
    assert refused.status_code == 402


async def test_monthly_spend_cap_of_a_key(client: httpx.AsyncClient, proxy: Server, mock_upstream: Server,
                                          factory: Factory, redis, redis_keys: RedisKeys) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, monthly_spend_cap_micros=5_000)
    url, body = proxy.url + "/v1/chat/completions", {"model": t.model, **CHAT, "max_tokens": 10}
    statuses = [(await client.post(url, headers=t.auth, json=body)).status_code for _ in range(40)]
    # Each request reserves ~1,000 µ$ and really costs ~200: the cap admits what its real cost allows.
    assert 15 <= statuses.count(200) < 40 and statuses[-1] == 402
    refused = await client.post(url, headers=t.auth, json=body)
    assert refused.json()["error"]["code"] == "spend_cap_reached"
    state = await settled(redis, redis_keys, t.org_id)
    month = time.strftime("%Y%m", time.gmtime())
    spent = int(await redis.get(redis_keys.org(t.org_id).key_spend(t.key_id, month)))
    assert spent <= 5_000
    assert state["balance"] == 100_000_000 - spent and state["reserved"] == 0
    _, other = await factory.key(t.org_id)  # another key of the org is not capped
    assert (await client.post(url, headers={"authorization": f"Bearer {other}"}, json=body)).status_code == 200


async def test_concurrent_requests_never_overdraw(
    proxy: Server, mock_upstream: Server, worker, factory: Factory, db, redis, redis_keys: RedisKeys,
) -> None:
    probe = await priced_tenant(factory, proxy, mock_upstream)
    body = orjson.dumps({"model": probe.model, **CHAT, "max_tokens": 10})
    reservation = -(-(len(body) * PRICE[0] + 10 * PRICE[1]) // 1_000_000)
    start = 50 * reservation  # covers exactly 50 requests' worst case
    t = await priced_tenant(factory, proxy, mock_upstream, balance=start)
    body = orjson.dumps({"model": t.model, **CHAT, "max_tokens": 10})
    assert -(-(len(body) * PRICE[0] + 10 * PRICE[1]) // 1_000_000) == reservation
    await configure_mock(mock_upstream, {t.model: {"latency_ms": 300}})

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        responses = await asyncio.gather(*(
            http.post(proxy.url + "/v1/chat/completions", headers={**t.auth, "content-type": "application/json"},
                      content=body) for _ in range(200)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 402}, statuses
    served = statuses.count(200)
    assert served >= 50  # all that the balance covers were served ...
    assert statuses.count(402) > 0  # ... and the rest refused

    records = await wait_usage(db, t.org_id, served)
    assert len(records) == served
    charged = sum(r["cost_micros"] for r in records)
    await asyncio.sleep(0.2)
    state = await live(redis, redis_keys, t.org_id)
    assert state["reserved"] == 0
    assert state["balance"] >= 0, "overdrawn"
    assert state["balance"] + charged == start
    assert await pg_money(db, t.org_id) == (start - charged, start - charged)


async def test_failed_request_is_not_charged_and_releases_its_reservation(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db, redis,
    redis_keys: RedisKeys,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, balance=1_000_000)
    await configure_mock(mock_upstream, {t.model: {"status": 500}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json={"model": t.model, **CHAT})
    assert resp.status_code == 502
    assert await settled(redis, redis_keys, t.org_id) == {"balance": 1_000_000, "reserved": 0, "credit": 0}
    await asyncio.sleep(0.5)
    assert await db.fetchval("select count(*) from usage_records where org_id = $1", t.org_id) == 0


async def test_streams_are_charged_from_the_hidden_usage_chunk(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream)
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth,
                             json={"model": t.model, **CHAT, "stream": True})
    assert resp.status_code == 200
    assert '"usage":{' not in resp.text  # the usage chunk we asked for stays hidden
    (record,) = await wait_usage(db, t.org_id, 1)
    assert record["completion_tokens"] == 8
    assert record["cost_micros"] == -(-(record["prompt_tokens"] * PRICE[0] + 8 * PRICE[1]) // 1_000_000)


async def test_broken_stream_is_charged_only_for_what_was_produced(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream)
    await configure_mock(mock_upstream, {t.model: {"chunks": 10, "fail_after_chunks": 3}})
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth,
                             json={"model": t.model, **CHAT, "stream": True})
    assert '"error"' in resp.text
    (record,) = await wait_usage(db, t.org_id, 1)
    # No usage from upstream: the documented estimate — content events forwarded, not the 10 asked for.
    assert 1 <= record["completion_tokens"] <= 4
    assert record["cost_micros"] > 0


async def test_client_disconnect_mid_stream_charges_what_was_produced(
    proxy: Server, mock_upstream: Server, worker, factory: Factory, db, redis, redis_keys: RedisKeys,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream)
    await configure_mock(mock_upstream, {t.model: {"chunks": 20, "chunk_delay_ms": 200}})
    trace = f"disc-{t.org_id}"
    async with httpx.AsyncClient(timeout=20) as http, http.stream(
        "POST", proxy.url + "/v1/chat/completions", headers={**t.auth, "x-request-id": trace},
        json={"model": t.model, **CHAT, "stream": True},
    ) as resp:
        received = 0
        async for chunk in resp.aiter_raw():
            received += chunk.count(b"data:")
            if received >= 3:
                break
    disconnected_at = time.time()
    started = time.monotonic()
    (record,) = await wait_usage(db, t.org_id, 1)
    assert time.monotonic() - started < 3, "settlement waited for the upstream to finish"
    # The proxy hung up on the upstream at once, so the provider stopped generating (20 × 200 ms = 4 s).
    async with httpx.AsyncClient() as http:
        gone = [d for d in (await http.get(mock_upstream.url + "/_mock/disconnects")).json() if d["model"] == t.model]
    assert len(gone) == 1 and gone[0]["time"] - disconnected_at < 1.0
    assert 1 <= record["completion_tokens"] < 20
    (log,) = await wait_for_rows(db, "select * from request_logs where client_request_id = $1", trace)
    assert (log["status_code"], log["error_code"]) == (499, "client_cancelled")
    assert log["cost_micros"] == record["cost_micros"]
    assert (await live(redis, redis_keys, t.org_id))["reserved"] == 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
async def test_a_client_that_leaves_after_the_last_event_was_answered_in_full(
    proxy: Server, mock_upstream: Server, worker, factory: Factory, db, redis, redis_keys: RedisKeys, path: str,
) -> None:
    """Streaming clients (the CLIs among them) hang up once the last event is in; the upstream may hold the
    stream open a while longer. That is a whole answer: logged 200 and billed, not a 499."""
    t = await priced_tenant(factory, proxy, mock_upstream)
    await configure_mock(mock_upstream, {t.model: {"chunks": 3, "chunk_delay_ms": 5, "linger_ms": 5000}})
    trace = f"linger-{t.org_id}-{path.rsplit('/', 1)[1]}"
    body = ({"model": t.model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
            if path == "/v1/messages" else {"model": t.model, "input": "hi"} if path == "/v1/responses"
            else {"model": t.model, **CHAT})
    end = {"/v1/messages": b"message_stop", "/v1/responses": b"response.completed"}.get(path, b"[DONE]")
    async with httpx.AsyncClient(timeout=20) as http, http.stream(
        "POST", proxy.url + path, headers={**t.auth, "x-request-id": trace}, json={**body, "stream": True},
    ) as resp:
        seen = b""
        async for chunk in resp.aiter_raw():
            seen += chunk
            if end in seen:
                break
    assert end in seen
    (record,) = await wait_usage(db, t.org_id, 1)
    (log,) = await wait_for_rows(db, "select * from request_logs where client_request_id = $1", trace)
    assert (log["status_code"], log["error_code"]) == (200, None)
    assert log["cost_micros"] == record["cost_micros"] > 0
    assert (await live(redis, redis_keys, t.org_id))["reserved"] == 0


async def test_each_request_pays_the_price_in_force_when_it_started(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, price=(1_000_000, 1_000_000))
    old_id = await db.fetchval("select id from model_prices where model = $1", t.model)
    switch_at = await db.fetchval("select now() + interval '1.5 seconds'")
    new_id = await db.fetchval(
        """insert into model_prices (model, input_micros_per_mtok, output_micros_per_mtok, effective_from)
           values ($1, 3000000, 5000000, $2) returning id""", t.model, switch_at)
    await factory.publish_config(proxy, t.api_key, t.model)
    deadline = time.monotonic() + 3.0
    sent = 0
    while time.monotonic() < deadline:
        resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth,
                                 json={"model": t.model, **CHAT, "max_tokens": 3})
        assert resp.status_code == 200
        sent += 1
        await asyncio.sleep(0.02)
    records = await wait_usage(db, t.org_id, sent)
    assert len(records) == sent
    prices = {old_id: (1_000_000, 1_000_000), new_id: (3_000_000, 5_000_000)}
    used = set()
    for r in records:
        expected_id = new_id if r["created_at"] >= switch_at else old_id
        assert r["price_id"] == expected_id, (r["created_at"], switch_at)
        p_in, p_out = prices[expected_id]
        assert r["cost_micros"] == -(-(r["prompt_tokens"] * p_in + r["completion_tokens"] * p_out) // 1_000_000)
        used.add(expected_id)
    assert used == {old_id, new_id}


async def test_top_up_is_idempotent_and_reaches_the_live_balance(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, db, redis,
    redis_keys: RedisKeys,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, balance=0)
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json={"model": t.model, **CHAT})
    assert resp.status_code == 402  # the live balance now exists, at zero
    scripts = BillingScripts(redis)
    payment = f"pi_{t.org_id}"
    first = await apply_ledger_entry(db, scripts, redis_keys, t.org_id, "topup", 2_000_000, external_id=payment)
    again = await apply_ledger_entry(db, scripts, redis_keys, t.org_id, "topup", 2_000_000, external_id=payment)
    assert first.created and not again.created and again.transaction_id == first.transaction_id
    other_org = await factory.org()
    with pytest.raises(ExternalIdTaken, match="another org"):
        await apply_ledger_entry(db, scripts, redis_keys, other_org, "topup", 2_000_000, external_id=payment)
    assert await pg_money(db, t.org_id) == (2_000_000, 2_000_000)
    assert (await live(redis, redis_keys, t.org_id))["balance"] == 2_000_000
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json={"model": t.model, **CHAT})
    assert resp.status_code == 200


async def test_top_up_while_the_live_balance_is_missing_is_counted_once(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, db, redis,
    redis_keys: RedisKeys,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, balance=0)
    scripts = BillingScripts(redis)
    result = await apply_ledger_entry(db, scripts, redis_keys, t.org_id, "adjustment", 3_000_000, reason="goodwill")
    assert result.created
    assert await redis.exists(redis_keys.org(t.org_id).balance) == 0
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json={"model": t.model, **CHAT})
    assert resp.status_code == 200
    state = await settled(redis, redis_keys, t.org_id)
    assert state["balance"] + state["reserved"] <= 3_000_000
    assert state["balance"] > 3_000_000 - 10_000  # one small request's cost, not the credit twice or never


async def test_reservation_of_a_crashed_request_expires_by_itself(
    client: httpx.AsyncClient, proxy: Server, mock_upstream: Server, factory: Factory, redis,
    redis_keys: RedisKeys,
) -> None:
    t = await priced_tenant(factory, proxy, mock_upstream, balance=1_000_000)
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json={"model": t.model, **CHAT})
    assert resp.status_code == 200  # creates the live balance
    org = redis_keys.org(t.org_id)
    scripts = BillingScripts(redis)
    now_ms = int(time.time() * 1000)
    # A proxy reserves 990,000 µ$ for a request, then dies without settling (reservation TTL: 1 ms).
    keys, args = reserve_call(org, "dead-request", 990_000, 1, t.key_id, (0, 0, 0, 0), now_ms, 1, org.balance, 0,
                              True, [], [])
    (reply,) = await scripts.reserve(keys=keys, args=args)
    assert reply[0] == 3
    assert (await live(redis, redis_keys, t.org_id))["reserved"] == 990_000
    await asyncio.sleep(0.01)
    resp = await client.post(proxy.url + "/v1/chat/completions", headers=t.auth, json={"model": t.model, **CHAT})
    assert resp.status_code == 200, "the dead request's reservation still blocked the balance"
    assert (await settled(redis, redis_keys, t.org_id))["reserved"] == 0
    assert not [m for m in await redis.zrange(org.reservations, 0, -1) if m.startswith(b"dead-request:")]

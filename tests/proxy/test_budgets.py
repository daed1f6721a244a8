"""Budgets through the real proxy: the limit holds under concurrency, the period rolls over, the 402 names the
budget and its reset, an org budget binds every key, and the hot path still makes two Redis calls.

The proxy is the clock's reader (`time.time()` when a request starts), so the calendar tests start proxies
with their wall clock set (`tests/clockshim`, time-machine in the child processes) on either side of a
period's end, rather than waiting for midnight.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import sys
from pathlib import Path

import httpx
import orjson
from redis.asyncio import Redis

from shared.billing import BillingScripts
from shared.embedded import free_port
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from tests.conftest import Factory, Server, Tenant, settings_env, start_server, wait_for_rows
from tests.invariants import OrgExpectation, assert_money_invariants
from tests.proxy.test_billing import PRICE
from tests.proxy.test_endpoints import CHAT, configure_mock

SHIM = Path(__file__).resolve().parent.parent / "clockshim"
ZONE = "America/New_York"


def start_clocked_proxy(settings: Settings, clock: str, **overrides: object) -> Server:
    """A proxy whose wall clock starts at `clock` (ISO, UTC) and ticks."""
    port = free_port()
    env = settings_env(settings, proxy_port=port, **overrides)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM), env.get("PYTHONPATH")]))
    env["RR_TEST_PROCESS_CLOCK"] = clock
    return start_server([sys.executable, "-m", "proxy.main"], env, port, "/readyz", "proxy")


async def add_budget(db, org_id: int, key_id: int | None, period: str, window: str, limit: int,
                     alert_percent: int | None = None) -> int:
    return await db.fetchval(
        """insert into budgets (org_id, api_key_id, period, window_kind, limit_micros, alert_percent)
           values ($1, $2, $3, $4, $5, $6) returning id""", org_id, key_id, period, window, limit, alert_percent)


async def budget_tenant(factory: Factory, proxy: Server, mock: Server,
                        budgets: list[tuple[bool, str, str, int]]) -> tuple[Tenant, list[int]]:
    """A priced tenant whose key has never been used, with budgets (for the key?, period, window, limit) in
    place before the proxy first reads its record. Returns it and the budget ids."""
    org_id = await factory.org()
    key_id, api_key = await factory.key(org_id)
    ids = [await add_budget(factory.db, org_id, key_id if for_key else None, period, window, limit)
           for for_key, period, window, limit in budgets]
    provider_id = await factory.provider(mock.url + "/v1")
    model = await factory.model(provider_id, price=PRICE)
    await factory.publish_config(proxy, api_key, model)
    return Tenant(org_id, key_id, api_key, model, provider_id), ids


async def counter(redis: Redis, key: str) -> int:
    return int(await redis.get(key) or 0)


async def post_many(proxy: Server, auth: dict, body: bytes, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        return await asyncio.gather(*(
            http.post(proxy.url + "/v1/chat/completions", headers={**auth, "content-type": "application/json"},
                      content=body) for _ in range(n)))


async def test_a_daily_budget_holds_under_50_concurrent_requests_and_opens_the_next_day(
    settings: Settings, mock_upstream: Server, worker, factory: Factory, db, redis, redis_keys: RedisKeys,
) -> None:
    # 16:00 in New York on the day clocks spring forward (a 23-hour day): it ends at 04:00 UTC.
    before = start_clocked_proxy(settings, "2027-03-14T20:00:00Z", budget_timezone=ZONE)
    try:
        limit = 20_000  # about 20 reservations' worth, 100 real costs'
        t, (budget_id, _) = await budget_tenant(factory, before, mock_upstream, [
            (True, "day", "calendar", limit), (False, "day", "calendar", 10_000_000)])  # the org's: never reached
        await configure_mock(mock_upstream, {t.model: {"latency_ms": 200}})
        body = orjson.dumps({"model": t.model, **CHAT, "max_tokens": 10})
        spent_by_rounds = []
        for _ in range(3):  # rounds of 50 at once until the budget refuses
            responses = await post_many(before, t.auth, body, 50)
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {200, 402}, statuses
            spent_by_rounds.append(statuses.count(200))
            if 402 in statuses:
                break
        refusals = [r for r in responses if r.status_code == 402]
        assert refusals, "50 concurrent requests after 100 never met the budget"
        error = refusals[0].json()["error"]
        assert (error["code"], error["type"]) == ("budget_exceeded", "insufficient_quota")
        assert error["budget"] == {"id": budget_id, "scope": "key", "period": "day", "window": "calendar",
                                   "limit_micros": limit, "spent_micros": error["budget"]["spent_micros"],
                                   "resets_at": "2027-03-15T04:00:00Z"}
        assert error["budget"]["spent_micros"] <= limit
        assert "calendar day (America/New_York)" in error["message"] and "$0.020000" in error["message"]
        assert refusals[0].headers["x-rr-budget-reset"] == "2027-03-15T04:00:00Z"
        assert 7 * 3600 < int(refusals[0].headers["retry-after"]) <= 8 * 3600
        served = sum(spent_by_rounds)
    finally:
        before.stop()

    org = redis_keys.org(t.org_id)
    key_counter = org.budget_calendar(f"k{t.key_id}", "day", "20270314")
    records = await wait_for_rows(db, "select cost_micros from usage_records where org_id = $1", t.org_id,
                                  count=served)
    charged = sum(r["cost_micros"] for r in records)
    # Reservations were corrected to the real costs: the counters hold exactly what was charged.
    assert await counter(redis, key_counter) == charged <= limit
    assert await counter(redis, org.budget_calendar("o", "day", "20270314")) == charged  # the org's too

    # The next local day (04:00:01 UTC): the key's budget is open again, in a counter of its own.
    after = start_clocked_proxy(settings, "2027-03-15T04:00:01Z", budget_timezone=ZONE)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(after.url + "/v1/chat/completions", headers=t.auth, content=body)
        assert resp.status_code == 200, resp.text
    finally:
        after.stop()
    assert 0 < await counter(redis, org.budget_calendar(f"k{t.key_id}", "day", "20270315")) <= 2_000
    assert await counter(redis, key_counter) == charged
    await assert_money_invariants(db, redis, settings, {t.org_id: OrgExpectation(
        billed=served + 1, budget_counters={key_counter: limit})})


async def test_an_org_rolling_budget_binds_every_key_of_the_org(
    proxy: Server, mock_upstream: Server, worker, factory: Factory, db, redis, redis_keys: RedisKeys,
    settings: Settings,
) -> None:
    t, (budget_id,) = await budget_tenant(factory, proxy, mock_upstream, [(False, "week", "rolling", 3_000)])
    _, other = await factory.key(t.org_id)
    body = orjson.dumps({"model": t.model, **CHAT, "max_tokens": 10})
    served, statuses = 0, []
    async with httpx.AsyncClient(timeout=30) as http:
        for i in range(60):
            auth = t.auth if i % 2 == 0 else {"authorization": f"Bearer {other}"}
            resp = await http.post(proxy.url + "/v1/chat/completions", headers=auth, content=body)
            statuses.append(resp.status_code)
            if resp.status_code == 402:
                break
            served += 1
        assert statuses[-1] == 402 and served >= 3
        refused = resp.json()["error"]
        assert refused["code"] == "budget_exceeded"
        assert refused["budget"]["scope"] == "org" and refused["budget"]["window"] == "rolling"
        assert refused["budget"]["id"] == budget_id and "rolling 7 days" in refused["message"]
        # The reset: when the earliest spend leaves the 7-day window (7 h buckets), within a week from now.
        resets = datetime.datetime.fromisoformat(refused["budget"]["resets_at"].replace("Z", "+00:00"))
        now = datetime.datetime.now(datetime.UTC)
        assert now + datetime.timedelta(days=7) - datetime.timedelta(hours=7) <= resets <= now + datetime.timedelta(
            days=7, seconds=5)
        for auth in (t.auth, {"authorization": f"Bearer {other}"}):  # both keys refused now
            assert (await http.post(proxy.url + "/v1/chat/completions", headers=auth,
                                    content=body)).status_code == 402
        # Anthropic's dialect gets its own shape, with the budget too.
        resp = await http.post(proxy.url + "/v1/messages", headers=t.auth,
                               json={"model": t.model, "max_tokens": 10, "messages": CHAT["messages"]})
        assert resp.status_code == 402
        assert resp.json()["error"]["type"] == "billing_error" and resp.json()["error"]["budget"]["scope"] == "org"
    rolling = await redis.hgetall(redis_keys.org(t.org_id).budget_rolling("o", "week"))
    records = await wait_for_rows(db, "select cost_micros from usage_records where org_id = $1", t.org_id,
                                  count=served)
    assert sum(map(int, rolling.values())) == sum(r["cost_micros"] for r in records) <= 3_000
    await assert_money_invariants(db, redis, settings, {t.org_id: OrgExpectation(
        billed=served, budget_counters={redis_keys.org(t.org_id).budget_rolling("o", "week"): 3_000})})


async def test_the_hot_path_makes_two_redis_calls_with_budgets(
    proxy: Server, mock_upstream: Server, factory: Factory, db, redis, redis_keys: RedisKeys,
) -> None:
    """MONITOR sees every command the server runs: around one request of a warm key with five budgets (key
    and org, calendar and rolling), exactly the reserve and the settle script touch the org's or the key's
    keys, and nothing else does."""
    t, _ = await budget_tenant(factory, proxy, mock_upstream, [
        (True, "day", "calendar", 10**7), (True, "day", "rolling", 10**7), (True, "month", "calendar", 10**7),
        (False, "week", "calendar", 10**7), (False, "month", "rolling", 10**7)])
    body = orjson.dumps({"model": t.model, **CHAT, "max_tokens": 10})
    prefix = t.api_key[3:11]
    scripts = BillingScripts(redis)
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.post(proxy.url + "/v1/chat/completions", headers=t.auth, content=body)).status_code == 200
        seen: list[dict] = []
        monitor_client = Redis.from_url(factory.settings.redis_url)
        async with monitor_client.monitor() as monitor:
            async def listen() -> None:
                while True:
                    seen.append(await monitor.next_command())

            listener = asyncio.create_task(listen())
            await asyncio.sleep(0.2)
            resp = await http.post(proxy.url + "/v1/chat/completions", headers=t.auth, content=body)
            await asyncio.sleep(0.5)  # settlement runs right after the answer's last byte
            listener.cancel()
        await monitor_client.aclose()
    assert resp.status_code == 200
    org = redis_keys.org(t.org_id)
    marks = (org.balance + " ", org.reservations, f":bud:{t.org_id}:", f":budr:{t.org_id}:", f"apikey:{prefix}")
    touching = [c for c in seen if any(m in c["command"] for m in marks)]
    # MONITOR lists the commands a script runs too, as from "lua": those are inside the two calls.
    ours = [c for c in touching if c["client_address"] != "lua"]
    inside = [c["command"] for c in touching if c["client_address"] == "lua"]
    assert sum(":bud:" in c or ":budr:" in c for c in inside) >= 10  # each budget read and counted
    names = [c["command"].split(" ", 2)[:2] for c in ours]
    assert [n[0].upper() for n in names] == ["EVALSHA", "EVALSHA"], [c["command"][:200] for c in ours]
    assert [n[1] for n in names] == [scripts.reserve.sha, scripts.settle.sha]
    # Both from the proxy's one pipelined connection, which sent nothing else meanwhile.
    proxy_conn = {(c["client_address"], c["client_port"]) for c in ours}
    assert len(proxy_conn) == 1
    assert len([c for c in seen if (c["client_address"], c["client_port"]) in proxy_conn]) == 2
    # The reserve call carried all five budget counters, and so did the settle call (to correct them).
    assert ours[1]["command"].count(":bud:") + ours[1]["command"].count(":budr:") == 5
    assert ours[0]["command"].count(":bud:") + ours[0]["command"].count(":budr:") == 5

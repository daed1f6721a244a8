"""Balance and transactions, usage per day × model × key, and request logs with filters, keyset pagination
and partition pruning (shown with EXPLAIN)."""

from __future__ import annotations

import datetime
import json
import secrets

import pytest

from control_plane.logs import LogFilter, log_window, request_log_query, usage_window
from shared.billing import BillingScripts, rebuild_balance
from shared.generations import new_request_id
from tests.conftest import ensure_partitions
from tests.control_plane.conftest import Portal

UTC = datetime.UTC


def _month_start(moment: datetime.datetime, months_ahead: int = 0) -> datetime.datetime:
    year, month = divmod(moment.month - 1 + months_ahead, 12)
    return datetime.datetime(moment.year + year, month + 1, 1, tzinfo=UTC)


async def test_balance_and_transactions(portal: Portal, db, redis, redis_keys) -> None:
    owner = await portal.signup()
    admin = await portal.platform_admin()
    url = f"/v1/admin/orgs/{owner.org_id}/adjustments"
    for amount in (5_000_000, -1_250_000, 300):
        resp = await portal.request("POST", url, admin, json={"amount_micros": amount, "reason": f"r{amount}"})
        assert resp.status_code == 201
    resp = await portal.request("POST", url, admin, json={"amount_micros": 7, "reason": "once", "external_id": "x1"})
    again = await portal.request("POST", url, admin, json={"amount_micros": 7, "reason": "once", "external_id": "x1"})
    assert resp.json()["created"] is True and again.json()["created"] is False
    assert again.json()["transaction_id"] == resp.json()["transaction_id"]
    assert (await portal.request("POST", url, admin, json={"amount_micros": 0, "reason": "zero"})).status_code == 422
    other = await portal.signup()
    resp = await portal.request("POST", f"/v1/admin/orgs/{other.org_id}/adjustments", admin,
                                json={"amount_micros": 7, "reason": "once", "external_id": "x1"})
    assert resp.status_code == 409

    balance = (await portal.request("GET", f"/v1/orgs/{owner.org_id}/balance", owner)).json()
    assert balance["balance_micros"] == 5_000_000 - 1_250_000 + 300 + 7
    assert isinstance(balance["balance_micros"], int) and balance["credit_limit_micros"] == 0
    assert balance["live_balance_micros"] in (None, balance["balance_micros"])

    page = (await portal.request("GET", f"/v1/orgs/{owner.org_id}/transactions", owner, params={"limit": 3})).json()
    assert [t["amount_micros"] for t in page["data"]] == [7, 300, -1_250_000]
    assert page["data"][0]["kind"] == "adjustment" and page["data"][0]["external_id"] == "x1"
    rest = (await portal.request("GET", f"/v1/orgs/{owner.org_id}/transactions", owner,
                                 params={"before_id": page["next_before_id"]})).json()
    assert [t["amount_micros"] for t in rest["data"]] == [5_000_000] and rest["next_before_id"] is None
    filtered = await portal.request("GET", f"/v1/orgs/{owner.org_id}/transactions", owner, params={"kind": "topup"})
    assert filtered.json()["data"] == []
    # With a live balance (as after the org's first proxied request), the API shows it, adjustments move
    # it, and a new credit limit reaches it at once.
    await rebuild_balance(db, BillingScripts(redis), redis_keys, owner.org_id)
    await portal.request("POST", url, admin, json={"amount_micros": 1_000, "reason": "live"})
    balance = (await portal.request("GET", f"/v1/orgs/{owner.org_id}/balance", owner)).json()
    assert balance["live_balance_micros"] == balance["balance_micros"] == 3_751_307
    assert balance["reserved_micros"] == 0
    resp = await portal.request("PATCH", f"/v1/admin/orgs/{owner.org_id}", admin,
                                json={"credit_limit_micros": 2_000_000})
    assert resp.status_code == 200 and resp.json()["credit_limit_micros"] == 2_000_000
    assert await redis.hget(redis_keys.org(owner.org_id).balance, "credit") == b"2000000"


async def test_usage_per_day_model_and_key(portal: Portal, db) -> None:
    owner = await portal.signup()
    now = datetime.datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    yesterday = now - datetime.timedelta(days=1)
    rows = [  # (created_at, key, model, prompt, completion, cost)
        (now, 1, "m-a", 10, 5, 100), (now, 1, "m-a", 20, 5, 150), (now, 2, "m-a", 1, 1, 7),
        (now, 1, "m-b", 3, 3, 9), (yesterday, 1, "m-a", 4, 4, 40),
    ]
    await ensure_partitions(db, "usage_records", now, yesterday)  # yesterday: last month, on the 1st
    for created_at, key, model, prompt, completion, cost in rows:
        await db.execute(
            """insert into usage_records (created_at, request_id, org_id, api_key_id, model, prompt_tokens,
                                          completion_tokens, cost_micros) values ($1, $2, $3, $4, $5, $6, $7, $8)""",
            created_at, secrets.token_hex(8), owner.org_id, key, model, prompt, completion, cost)
    resp = await portal.request("GET", f"/v1/orgs/{owner.org_id}/usage", owner)
    body = resp.json()
    assert resp.status_code == 200 and body["total_cost_micros"] == 306
    got = [(r["day"], r["model"], r["api_key_id"], r["requests"], r["prompt_tokens"], r["completion_tokens"],
            r["cost_micros"]) for r in body["data"]]
    today, before = now.date().isoformat(), yesterday.date().isoformat()
    assert got == [(before, "m-a", 1, 1, 4, 4, 40), (today, "m-a", 1, 2, 30, 10, 250), (today, "m-a", 2, 1, 1, 1, 7),
                   (today, "m-b", 1, 1, 3, 3, 9)]
    one_day = await portal.request("GET", f"/v1/orgs/{owner.org_id}/usage", owner,
                                   params={"start": today, "end": today, "model": "m-a", "key_id": 1})
    assert [r["cost_micros"] for r in one_day.json()["data"]] == [250]
    bad = await portal.request("GET", f"/v1/orgs/{owner.org_id}/usage", owner, params={"start": today, "end": before})
    assert bad.status_code == 422


async def _insert_logs(db, org_id: int, times: list[datetime.datetime], **columns) -> None:
    await db.executemany(
        """insert into request_logs (created_at, request_id, org_id, api_key_id, model, path, method, status_code,
                                     latency_ms) values ($1, $2, $3, $4, $5, '/v1/chat/completions', 'POST', $6, 12)""",
        [(t, f"req-{secrets.token_hex(6)}", org_id, columns.get("key", 1), columns.get("model", "m"),
          columns.get("status", 200)) for t in times])


async def test_request_logs_filters_and_keyset_pages(portal: Portal, db) -> None:
    owner = await portal.signup()
    now = datetime.datetime.now(UTC)
    base = now - datetime.timedelta(hours=1)
    await ensure_partitions(db, "request_logs", base, now, now - datetime.timedelta(days=3))
    # Several rows share one timestamp: the cursor must still visit each exactly once.
    times = [base + datetime.timedelta(seconds=i // 3) for i in range(25)]
    await _insert_logs(db, owner.org_id, times)
    await _insert_logs(db, owner.org_id, [base] * 2, key=2, model="other", status=429)
    url = f"/v1/orgs/{owner.org_id}/request-logs"

    seen, cursor = [], None
    while True:
        params = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        page = (await portal.request("GET", url, owner, params=params)).json()
        seen += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 27 and len({r["request_id"] for r in seen}) == 27
    order = [(r["created_at"], r["request_id"]) for r in seen]
    assert order == sorted(order, key=lambda x: (-datetime.datetime.fromisoformat(x[0]).timestamp(), x[1]))
    assert seen[0]["path"] == "/v1/chat/completions" and "body" not in seen[0]

    for params, count in (({"key_id": 2}, 2), ({"model": "other"}, 2), ({"status": 429}, 2), ({"status": 200}, 25),
                          ({"start": (base + datetime.timedelta(seconds=5)).isoformat()}, 10),
                          ({"end": (base + datetime.timedelta(seconds=1)).isoformat()}, 5)):
        data = (await portal.request("GET", url, owner, params={**params, "limit": 100})).json()["data"]
        assert len(data) == count, params
    # The default window is the last 24 hours; the range is bounded.
    old = now - datetime.timedelta(days=3)
    await _insert_logs(db, owner.org_id, [old])
    assert len((await portal.request("GET", url, owner, params={"limit": 100})).json()["data"]) == 27
    resp = await portal.request("GET", url, owner, params={"start": (now - datetime.timedelta(days=94)).isoformat()})
    assert resp.status_code == 422
    resp = await portal.request("GET", url, owner, params={"cursor": "bm90IGEgY3Vyc29y"})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_cursor"


def _scanned_partitions(plan: dict) -> set[str]:
    found = set()

    def walk(node: dict) -> None:
        if "Relation Name" in node:
            found.add(node["Relation Name"])
        for child in node.get("Plans", ()):
            walk(child)
    walk(plan["Plan"])
    return found


def _literal(value: object) -> str:
    if isinstance(value, datetime.datetime):
        return f"'{value.isoformat()}'"
    return str(value) if isinstance(value, int) else "'" + str(value).replace("'", "''") + "'"


def _subplans_removed(plan: dict) -> int:
    def walk(node: dict) -> int:
        return node.get("Subplans Removed", 0) + sum(walk(c) for c in node.get("Plans", ()))
    return walk(plan["Plan"])


@pytest.mark.calendar
async def test_request_log_queries_prune_partitions(db) -> None:
    """With rows in two monthly partitions, a page of one month scans only that month's partition, both with
    a custom plan (pruned at planning) and with a generic prepared plan (pruned at executor start-up)."""
    org_id = 10_000_000 + secrets.randbelow(1_000_000)
    now = datetime.datetime.now(UTC)
    this_month, next_month = _month_start(now), _month_start(now, 1)
    # The rows go up to three "month lengths" on: four months, of which only three may exist yet.
    await ensure_partitions(db, "request_logs", *(this_month + k * (next_month - this_month) for k in range(4)))
    # A few thousand rows in this month and in next month's partition (it exists ahead of time).
    await db.execute(
        """insert into request_logs (created_at, request_id, org_id, api_key_id, model, path, method, status_code,
                                     latency_ms)
           select $2::timestamptz + (g % 1000) * interval '1 second' + (g / 1000) * ($3::timestamptz - $2::timestamptz),
                  'explain-' || g, $1, 1 + g % 5, 'm', '/v1/chat/completions', 'POST', 200, 5
           from generate_series(0, 3999) g""", org_id, this_month, next_month)
    await db.execute("analyze request_logs")
    partitions = {r["relname"] for r in await db.fetch(
        """select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid
           where i.inhparent = 'request_logs'::regclass""")}
    assert len(partitions) >= 3
    this_part = f"request_logs_y{this_month:%Y}m{this_month:%m}"
    next_part = f"request_logs_y{next_month:%Y}m{next_month:%m}"

    query = LogFilter(org_id, this_month, this_month + datetime.timedelta(days=3), 50, api_key_id=2)
    sql, args = request_log_query(query)
    async with db.acquire() as conn:
        [plan] = json.loads(await conn.fetchval("explain (format json) " + sql, *args))
        assert _scanned_partitions(plan) == {this_part}, plan
        rows = await conn.fetch(sql, *args)
        assert len(rows) == 51 and all(r["api_key_id"] == 2 for r in rows)

        # A generic plan (what a long-lived prepared statement may use) prunes when the executor starts.
        await conn.execute("set plan_cache_mode = force_generic_plan")
        try:
            await conn.execute("prepare page as " + sql)
            values = ", ".join(_literal(a) for a in args)
            [generic] = json.loads(await conn.fetchval(f"explain (analyze, format json) execute page({values})"))
        finally:
            await conn.execute("deallocate page")
            await conn.execute("reset plan_cache_mode")
        assert _scanned_partitions(generic) == {this_part}
        assert _subplans_removed(generic) == len(partitions) - 1, generic

        # A range across the month boundary scans exactly the two months.
        across = LogFilter(org_id, next_month - datetime.timedelta(days=1), next_month + datetime.timedelta(days=1),
                           50)
        sql, args = request_log_query(across)
        [plan] = json.loads(await conn.fetchval("explain (format json) " + sql, *args))
        assert _scanned_partitions(plan) == {this_part, next_part}
        # The page is an ordered index range scan, not a sort of the whole month.
        assert "request_logs_org_idx" in json.dumps(plan) or "org_id_created_at" in json.dumps(plan)


async def test_uncharged_usage_is_visible_to_platform_admins_only(portal: Portal, db) -> None:
    admin = await portal.platform_admin()
    owner = await portal.signup()
    other = await portal.signup()
    now = datetime.datetime.now(UTC)
    rows = [(owner.org_id, "m-x", 100, 40), (owner.org_id, "m-x", 100, 60), (owner.org_id, "m-y", 5, 0),
            (other.org_id, "m-x", 7, 3)]
    for org_id, model, cost, uncharged in rows:
        await db.execute(
            """insert into usage_records (created_at, request_id, org_id, api_key_id, model, provider, route_id,
                                          prompt_tokens, completion_tokens, cost_micros, uncharged_micros)
               values ($1, $2, $3, 1, $4, 'p', 9, 1, 1, $5, $6)""",
            now, secrets.token_hex(8), org_id, model, cost, uncharged)
    resp = await portal.request("GET", "/v1/admin/uncharged-usage", admin, params={"org_id": owner.org_id})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [(r["model"], r["requests"], r["charged_micros"], r["uncharged_micros"]) for r in body["data"]] == [
        ("m-x", 2, 200, 100)]  # m-y was charged in full: not listed
    assert body["total_uncharged_micros"] == 100
    everyone = (await portal.request("GET", "/v1/admin/uncharged-usage", admin)).json()
    assert {r["org_id"] for r in everyone["data"]} >= {owner.org_id, other.org_id}
    assert (await portal.request("GET", "/v1/admin/uncharged-usage", owner)).status_code == 403
    later = (now + datetime.timedelta(days=1)).isoformat()
    empty = await portal.request("GET", "/v1/admin/uncharged-usage", admin,
                                 params={"org_id": owner.org_id, "start": later})
    assert empty.status_code == 422  # start after the default end (now)


@pytest.mark.calendar
def test_default_windows_follow_the_clock_across_month_and_year_ends() -> None:
    """The listings' defaults, from the caller's clock: the last 30 UTC days of usage, the last 24 hours of
    request logs — across a month's or a year's end when the clock (RR_TEST_FROZEN_CLOCK) is there."""
    now = datetime.datetime.now(UTC)
    start, end = usage_window(None, None, now)
    assert end == now.date() and (end - start).days == 29
    assert usage_window(None, end, now)[0] == start
    first, last = log_window(None, None, now)
    assert last == now and now - first == datetime.timedelta(hours=24)
    new_year = datetime.datetime(2027, 1, 1, 0, 0, 30, tzinfo=UTC)
    assert usage_window(None, None, new_year) == (datetime.date(2026, 12, 3), datetime.date(2027, 1, 1))
    assert log_window(None, None, new_year)[0] == datetime.datetime(2026, 12, 31, 0, 0, 30, tzinfo=UTC)



async def insert_request_log(db, org_id: int, *, usage: dict | None = None, price_id: int | None = None,
                             cost: int = 0) -> tuple[str, datetime.datetime]:
    """A request log row (and, with `usage`, its usage record) as the proxy and the flusher write them."""
    now = datetime.datetime.now(UTC).replace(microsecond=123456)
    request_id = new_request_id(now.timestamp())
    await db.execute(
        """insert into request_logs (created_at, request_id, org_id, api_key_id, model, path, method, status_code,
                                     stream, latency_ms, prompt_tokens, completion_tokens, cost_micros)
           values ($1, $2, $3, 1, 'm-detail', '/v1/chat/completions', 'POST', 200, false, 12, $4, $5, $6)""",
        now, request_id, org_id, (usage or {}).get("prompt_tokens"), (usage or {}).get("completion_tokens"), cost)
    if usage is not None:
        columns = ", ".join(usage)
        params = ", ".join(f"${i}" for i in range(7, 7 + len(usage)))
        await db.execute(
            f"""insert into usage_records (created_at, request_id, org_id, api_key_id, model, price_id, cost_micros,
                                           {columns}) values ($1, $2, $3, 1, $4, $5, $6, {params})""",
            now, request_id, org_id, "m-detail", price_id, cost, *usage.values())
    return request_id, now


async def _component_price(db) -> int:
    model = f"m-{secrets.token_hex(3)}"
    await db.execute("insert into models (name, kind) values ($1, 'chat')", model)
    return await db.fetchval(
        """insert into model_prices (model, input_micros_per_mtok, output_micros_per_mtok,
                                     cached_input_micros_per_mtok, reasoning_micros_per_mtok, effective_from)
           values ($1, 2500000, 10000000, 1250000, 12000000, '2000-01-01') returning id""", model)


async def test_usage_and_request_logs_show_tokens_and_cost_per_component(portal: Portal, db) -> None:
    owner = await portal.signup()
    other = await portal.signup()
    price_id = await _component_price(db)
    usage = {"prompt_tokens": 100_000, "completion_tokens": 1_000, "cached_input_tokens": 90_000,
             "reasoning_tokens": 600}
    # 10,000 × 2.5 + 90,000 × 1.25 + 400 × 10 + 600 × 12 = 25,000 + 112,500 + 4,000 + 7,200 = 148,700 µ$
    request_id, _ = await insert_request_log(db, owner.org_id, usage=usage, price_id=price_id, cost=148_700)
    body = (await portal.request("GET", f"/v1/orgs/{owner.org_id}/usage", owner)).json()
    (row,) = [r for r in body["data"] if r["model"] == "m-detail"]
    assert row["cost_micros"] == 148_700
    assert row["components"] == {"input": {"tokens": 10_000, "cost_micros": 25_000},
                                 "cached_input": {"tokens": 90_000, "cost_micros": 112_500},
                                 "output": {"tokens": 400, "cost_micros": 4_000},
                                 "reasoning": {"tokens": 600, "cost_micros": 7_200}}
    detail = await portal.request("GET", f"/v1/orgs/{owner.org_id}/request-logs/{request_id}", owner)
    assert detail.status_code == 200, detail.text
    assert detail.json()["components"] == row["components"] and detail.json()["billed"] is True
    assert detail.json()["cost_micros"] == 148_700
    elsewhere = await portal.request("GET", f"/v1/orgs/{other.org_id}/request-logs/{request_id}", other)
    assert elsewhere.status_code == 404  # another org's request is not there for it
    assert (await portal.request("GET", f"/v1/orgs/{owner.org_id}/request-logs/nope", owner)).status_code == 404

"""`budget.exceeded` events from the period spend in PostgreSQL, with the clock handed in: the soft threshold
and the limit each once per budget per period, re-armed by the next period, in the budget's time zone; and
end to end, emitted by the flusher after traffic through the real proxy."""

from __future__ import annotations

import datetime
import secrets
from zoneinfo import ZoneInfo

import httpx
import orjson

from shared.budgets import BudgetCalendar
from shared.workers.budget_alerts import emit_budget_events
from tests.conftest import Factory, Server, ensure_partitions, wait_for_rows
from tests.proxy.test_budgets import budget_tenant
from tests.proxy.test_endpoints import CHAT

NEW_YORK = BudgetCalendar(ZoneInfo("America/New_York"))


def _at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


async def _spend(db, org_id: int, key_id: int | None, when: str, cost: int) -> None:
    await ensure_partitions(db, "usage_records", _at(when))
    await db.execute("""insert into usage_records (created_at, request_id, org_id, api_key_id, model, cost_micros)
                        values ($1, $2, $3, $4, 'm', $5)""", _at(when), secrets.token_hex(8), org_id, key_id, cost)


async def _events(db, org_id: int) -> list[dict]:
    rows = await db.fetch("""select payload, dedupe_key from event_outbox where org_id = $1
                             and event_type = 'budget.exceeded' order by id""", org_id)
    return [{**orjson.loads(r["payload"]), "dedupe_key": r["dedupe_key"]} for r in rows]


async def _emit(db, org_id: int, when: str) -> int:
    async with db.acquire() as conn, conn.transaction():
        return await emit_budget_events(conn, [org_id], _at(when).timestamp(), NEW_YORK)


async def test_soft_then_limit_once_per_calendar_day_in_the_zone(factory: Factory, db) -> None:
    org_id = await factory.org()
    key_id, _ = await factory.key(org_id)
    budget = await db.fetchval("""insert into budgets (org_id, api_key_id, period, window_kind, limit_micros,
                                                       alert_percent) values ($1, $2, 'day', 'calendar', 1000, 80)
                                  returning id""", org_id, key_id)
    # 23:30 on 14 March in New York is 03:30 UTC on the 15th: the spend belongs to the 14th there.
    await _spend(db, org_id, key_id, "2027-03-15T03:30:00+00:00", 799)
    assert await _emit(db, org_id, "2027-03-15T03:40:00+00:00") == 0  # below 80 %
    await _spend(db, org_id, None, "2027-03-15T03:31:00+00:00", 500)  # no key: not this key's spend
    await _spend(db, org_id, key_id, "2027-03-14T04:59:00+00:00", 500)  # the 13th in New York
    assert await _emit(db, org_id, "2027-03-15T03:40:00+00:00") == 0
    await _spend(db, org_id, key_id, "2027-03-15T03:32:00+00:00", 1)
    assert await _emit(db, org_id, "2027-03-15T03:41:00+00:00") == 1
    assert await _emit(db, org_id, "2027-03-15T03:42:00+00:00") == 0  # once per period
    (soft,) = await _events(db, org_id)
    assert soft == {"budget_id": budget, "scope": "key", "api_key_id": key_id, "period": "day",
                    "window": "calendar", "level": "soft", "limit_micros": 1000, "threshold_micros": 800,
                    "alert_percent": 80, "spent_micros": 800, "period_start": "2027-03-14T05:00:00Z",
                    "resets_at": "2027-03-15T04:00:00Z", "dedupe_key": f"budget:{budget}:20270314:soft"}
    await _spend(db, org_id, key_id, "2027-03-15T03:50:00+00:00", 200)
    assert await _emit(db, org_id, "2027-03-15T03:55:00+00:00") == 1
    assert [e["level"] for e in await _events(db, org_id)] == ["soft", "limit"]
    # The next local day starts from nothing: re-armed, and its own crossing is announced again.
    assert await _emit(db, org_id, "2027-03-15T04:00:00+00:00") == 0
    await _spend(db, org_id, key_id, "2027-03-15T12:00:00+00:00", 900)
    assert await _emit(db, org_id, "2027-03-15T12:01:00+00:00") == 1
    assert (await _events(db, org_id))[-1]["dedupe_key"] == f"budget:{budget}:20270315:soft"


async def test_rolling_and_org_budgets_and_budgets_without_a_soft_threshold(factory: Factory, db) -> None:
    org_id = await factory.org()
    key_id, _ = await factory.key(org_id)
    rolling = await db.fetchval("""insert into budgets (org_id, period, window_kind, limit_micros, alert_percent)
                                   values ($1, 'week', 'rolling', 1000, 50) returning id""", org_id)
    hard_only = await db.fetchval("""insert into budgets (org_id, period, window_kind, limit_micros)
                                     values ($1, 'month', 'calendar', 1500) returning id""", org_id)
    await _spend(db, org_id, key_id, "2027-05-01T12:00:00+00:00", 600)  # in May, outside the rolling week
    await _spend(db, org_id, key_id, "2027-05-20T00:00:00+00:00", 400)
    await _spend(db, org_id, None, "2027-05-25T00:00:00+00:00", 200)
    assert await _emit(db, org_id, "2027-05-26T00:00:00+00:00") == 1
    (event,) = await _events(db, org_id)
    assert (event["budget_id"], event["level"], event["spent_micros"], event["scope"]) == (rolling, "soft", 600, "org")
    assert "resets_at" not in event
    await _spend(db, org_id, key_id, "2027-05-25T01:00:00+00:00", 400)
    assert await _emit(db, org_id, "2027-05-26T00:00:00+00:00") == 2  # the rolling limit and the month's limit
    events = await _events(db, org_id)
    assert {(e["budget_id"], e["level"]) for e in events[1:]} == {(rolling, "limit"), (hard_only, "limit")}


async def test_the_flusher_emits_the_event_after_real_traffic(
    proxy: Server, mock_upstream: Server, worker, factory: Factory, db,
) -> None:
    t, (budget,) = await budget_tenant(factory, proxy, mock_upstream, [(True, "day", "calendar", 100_000)])
    await db.execute("update budgets set alert_percent = 1 where id = $1", budget)  # 1,000 µ$: ~5 requests
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(20):
            resp = await http.post(proxy.url + "/v1/chat/completions", headers=t.auth,
                                   json={"model": t.model, **CHAT, "max_tokens": 10})
            assert resp.status_code == 200
    rows = await wait_for_rows(db, """select payload from event_outbox where org_id = $1
                                      and event_type = 'budget.exceeded'""", t.org_id, timeout=20)
    assert len(rows) == 1
    event = orjson.loads(rows[0]["payload"])
    assert (event["budget_id"], event["level"], event["threshold_micros"]) == (budget, "soft", 1_000)
    assert event["spent_micros"] >= 1_000

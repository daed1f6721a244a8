"""The billing flusher as a writer: events PostgreSQL refuses are held for repair (never dropped) while the
rest of their batch is written, and events of months without a partition get their partitions.

Each test runs a `BillingFlusher` in this process on the test database, with a Redis prefix of its own (so
the session's worker process never sees these events) and one stream shard (so they form one batch).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime

import msgspec
import pytest

from shared.billing import UsageEvent
from shared.reconcile import Drift, reconcile
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from shared.workers.flusher import BillingFlusher, _Held, _keep
from tests.conftest import Factory

_encode = msgspec.msgpack.Encoder().encode


def _event(org_id: int, cost: int, *, model: str = "m", at: datetime | None = None, **fields: object) -> UsageEvent:
    created_us = int((at.timestamp() if at else time.time()) * 1_000_000)
    values = dict(request_id=secrets.token_hex(12), created_us=created_us, org_id=org_id, api_key_id=1,
                  model=model, provider="p", route_id=None, prompt_tokens=10, completion_tokens=5,
                  cost_micros=cost, price_id=None, byok=False)
    return UsageEvent(**{**values, **fields})


async def _run_flusher(settings: Settings, db, redis, events: list[UsageEvent], until) -> BillingFlusher:
    """XADD `events` as the settle script does (fields o, c, d), run a flusher until `until(flusher)`."""
    keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
    for e in events:
        await redis.xadd(keys.org(e.org_id).stream, {"o": e.org_id, "c": e.cost_micros, "d": _encode(e)})
    flusher = BillingFlusher(settings, db, redis)
    task = asyncio.create_task(flusher.run())
    try:
        for _ in range(500):
            if until(flusher) or task.done():
                break
            await asyncio.sleep(0.02)
    finally:
        flusher.stop()
        await asyncio.wait_for(task, 10)
    return flusher


@pytest.fixture
def own_settings(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, redis_prefix=f"{settings.redis_prefix}fl{secrets.token_hex(3)}:",
                                   billing_shards=1, flusher_interval_ms=20, flusher_block_ms=50)


async def _money(db, org_id: int) -> tuple[int, int]:
    row = await db.fetchrow(
        """select b.balance_micros, (select coalesce(sum(amount_micros), 0) from balance_transactions t
                                     where t.org_id = b.org_id)::bigint as ledger
           from org_balances b where b.org_id = $1""", org_id)
    return row["balance_micros"], row["ledger"]


async def test_flusher_holds_a_poison_event_and_writes_the_rest(own_settings: Settings, factory: Factory, db,
                                                                redis) -> None:
    """A valid event PostgreSQL refuses (a NUL in its model; a token count beyond integer) failed its batch
    forever, so no later event of the shard reached the ledger. Now: held with its ledger debit, the rest
    written, the entries acknowledged."""
    good_a, nul_org, big_org, good_b = [await factory.org(balance_micros=1_000_000) for _ in range(4)]
    gone = await factory.org(balance_micros=1_000_000)
    events = [_event(good_a, 100), _event(nul_org, 70, model="bad\x00model"),
              _event(big_org, 30, prompt_tokens=2**31), _event(good_b, 5), _event(gone, 9, model="x\x00")]
    await db.execute("delete from orgs where id = $1", gone)  # deleted since: even the debit is refused
    flusher = await _run_flusher(own_settings, db, redis, events, lambda f: f.flushed + f.held >= 5)
    assert (flusher.flushed, flusher.held) == (2, 3)

    got = {r["request_id"]: r for r in await db.fetch(
        "select * from usage_records where request_id = any($1)", [e.request_id for e in events])}
    assert set(got) == {events[0].request_id, events[3].request_id}
    held = {r["request_id"]: r for r in await db.fetch(
        "select * from rejected_rows where kind = 'usage_event' and request_id = any($1)",
        [e.request_id for e in events])}
    assert set(held) == {events[1].request_id, events[2].request_id, events[4].request_id}
    for e in events[1:3] + events[4:]:
        row = held[e.request_id]
        assert msgspec.msgpack.decode(row["payload"], type=UsageEvent) == e  # kept whole, for repair
        assert row["org_id"] == e.org_id and row["cost_micros"] == e.cost_micros and row["resolved_at"] is None
    assert held[events[1].request_id]["sqlstate"] == "22021"
    assert held[events[2].request_id]["sqlstate"] is None  # refused by the driver (int4 overflow)
    assert held[events[4].request_id]["transaction_id"] is None
    # Money: every org's PostgreSQL balance is the sum of its ledger, and each event was debited once —
    # the held ones too, as settle already debited them live.
    for org_id, cost in ((good_a, 100), (nul_org, 70), (big_org, 30), (good_b, 5)):
        assert await _money(db, org_id) == (1_000_000 - cost, 1_000_000 - cost)
    txn = await db.fetchrow("select * from balance_transactions where id = $1",
                            held[events[1].request_id]["transaction_id"])
    assert (txn["kind"], txn["amount_micros"], txn["request_count"]) == ("usage", -70, 1)
    keys = RedisKeys(own_settings.redis_prefix, 1)
    assert (await redis.xpending(keys.stream(0), RedisKeys.BILLING_GROUP))["pending"] == 0

    # The shard keeps flushing, and the reconciler names the held events.
    later = _event(good_a, 11)
    flusher = await _run_flusher(own_settings, db, redis, [later], lambda f: f.flushed >= 1)
    assert await db.fetchval("select count(*) from usage_records where request_id = $1", later.request_id) == 1
    assert await _money(db, good_a) == (1_000_000 - 111, 1_000_000 - 111)
    found = {(d.org_id, d.kind): d for d in await reconcile(own_settings)}
    assert found[(nul_org, "held")] == Drift(nul_org, "held", 70, 70, 1)
    assert found[(gone, "held")] == Drift(gone, "held", 0, 9, 1)
    assert (good_a, "held") not in found


async def test_a_replayed_batch_holds_and_debits_a_poison_event_once(own_settings: Settings, factory: Factory,
                                                                      db, redis) -> None:
    org_id = await factory.org(balance_micros=1_000)
    bad = _event(org_id, 40, model="\x00")
    await _run_flusher(own_settings, db, redis, [bad], lambda f: f.held >= 1)
    # The same entry again (as after a crash between the commit and the ACK): nothing changes.
    keys = RedisKeys(own_settings.redis_prefix, 1)
    [(entry_id, fields)] = await redis.xrange(keys.stream(0))
    flusher = BillingFlusher(own_settings, db, redis)
    kept = await flusher._write([], [], {}, 0, *map(int, entry_id.decode().split("-")))
    assert kept == []
    async with db.acquire() as conn, conn.transaction():
        await _keep(conn, _Held(entry_id.decode(), fields[b"d"], bad).refused("22021", "X"), 0)
    assert await db.fetchval("select count(*) from rejected_rows where request_id = $1", bad.request_id) == 1
    assert await _money(db, org_id) == (960, 960)


@pytest.mark.calendar
async def test_flusher_writes_events_of_months_without_a_partition(own_settings: Settings, factory: Factory,
                                                                   db, redis) -> None:
    """A late event (a month long past) and one far ahead are billing evidence: their months get partitions
    and both are written (before, the flusher only ever created this month and the next two, and retried
    the batch forever)."""
    org_id = await factory.org(balance_micros=1_000)
    events = [_event(org_id, 3, at=datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)), _event(org_id, 4),
              _event(org_id, 5, at=datetime(2150, 1, 1, tzinfo=UTC))]
    flusher = await _run_flusher(own_settings, db, redis, events, lambda f: f.flushed >= 3)
    assert (flusher.flushed, flusher.held) == (3, 0)
    parts = {r["request_id"]: r["part"] for r in await db.fetch(
        "select request_id, tableoid::regclass::text as part from usage_records where request_id = any($1)",
        [e.request_id for e in events])}
    assert parts[events[0].request_id] == "usage_records_y1999m12"
    assert parts[events[2].request_id] == "usage_records_y2150m01"
    assert await _money(db, org_id) == (1_000 - 12, 1_000 - 12)


async def test_an_undecodable_event_is_held_with_the_debit_settle_made(own_settings: Settings, factory: Factory,
                                                                       db, redis) -> None:
    """Settle debited the live balance already; an entry whose payload does not decode used to go to the
    dead-letter stream with no ledger effect, so a balance rebuild would have handed its cost back."""
    org_id, good = await factory.org(balance_micros=1_000_000), await factory.org(balance_micros=1_000_000)
    keys = RedisKeys(own_settings.redis_prefix, own_settings.billing_shards)
    await redis.xadd(keys.org(org_id).stream, {"o": org_id, "c": 321, "d": b"\xc1not msgpack"})
    flusher = await _run_flusher(own_settings, db, redis, [_event(good, 10)], lambda f: f.flushed + f.held >= 2)
    assert (flusher.flushed, flusher.held) == (1, 1)
    row = await db.fetchrow("select * from rejected_rows where org_id = $1", org_id)
    assert row["kind"] == "usage_event" and row["cost_micros"] == 321 and row["transaction_id"] is not None
    assert await _money(db, org_id) == (1_000_000 - 321, 1_000_000 - 321)
    assert await _money(db, good) == (1_000_000 - 10, 1_000_000 - 10)
    assert await redis.xlen(keys.stream(0) + ":dead") == 0


async def test_a_stopping_flusher_writes_what_the_stream_still_holds(own_settings: Settings, factory: Factory, db,
                                                                     redis) -> None:
    """Stopped between two reads (its interval long) with more than a batch waiting, the flusher used to write one
    batch and exit with the rest still in the stream: with the embedded Redis of `make run` gone next, they were
    lost. Now it reads until the stream is empty."""
    settings = msgspec.structs.replace(own_settings, flusher_interval_ms=60_000, flusher_batch_size=2)
    org_id = await factory.org(balance_micros=1_000_000)
    keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
    flusher = BillingFlusher(settings, db, redis)
    task = asyncio.create_task(flusher.run())
    for _ in range(200):  # its first read (nothing there yet) is done: it now waits out the long interval
        if await redis.exists(keys.stream(0)) and await redis.xinfo_groups(keys.stream(0)):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    for cost in (100, 20, 3, 1, 7):
        e = _event(org_id, cost)
        await redis.xadd(keys.org(org_id).stream, {"o": e.org_id, "c": e.cost_micros, "d": _encode(e)})
    flusher.stop()
    await asyncio.wait_for(task, 10)
    assert flusher.flushed == 5
    assert await _money(db, org_id) == (1_000_000 - 131, 1_000_000 - 131)

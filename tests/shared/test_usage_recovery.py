"""The usage recovery (shared/workers/recovery.py): billed answers whose usage event Redis lost are billed once
from the request log; answers whose event is late (waiting in the stream, or arriving after the recovery billed
them) are not billed twice.

A database of its own: the recovery looks at every org's request logs and keeps a cursor per shard, which the
session's other tests (and its rr-worker) must not share. One stream shard, a Redis prefix of its own, and
a short reservation lifetime and grace, so that request times can be placed before and after the grace
without waiting: each pass is given its `now`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import msgspec
import pytest_asyncio
from redis.asyncio import Redis

from shared.billing import RECOVERED_USAGE_REASON, BillingScripts, UsageEvent, rebuild_balance
from shared.db.migrate import migrate
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from shared.workers.flusher import BillingFlusher
from shared.workers.recovery import UsageRecovery
from tests.conftest import Factory, ensure_partitions
from tests.invariants import OrgExpectation, assert_money_invariants

_encode = msgspec.msgpack.Encoder().encode
GRACE_S = 90.0


@pytest_asyncio.fixture
async def own(settings: Settings) -> AsyncIterator[tuple[Settings, asyncpg.Pool]]:
    name = f"rr_recovery_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(settings.database_url)
    await admin.execute(f'create database "{name}"')
    url = settings.database_url.rsplit("/", 1)[0] + f"/{name}"
    await migrate(url)
    own_settings = msgspec.structs.replace(
        settings, database_url=url, redis_prefix=f"{settings.redis_prefix}uc{secrets.token_hex(3)}:",
        billing_shards=1, flusher_interval_ms=20, flusher_block_ms=50, reservation_ttl_s=60,
        max_request_duration_s=30, usage_recovery_grace_s=GRACE_S)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    try:
        yield own_settings, pool
    finally:
        await pool.close()
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


class Answer:
    """One request as the proxy records it: its request-log row and, when billed, the event settle appends."""

    def __init__(self, org_id: int, started: float, cost: int | None) -> None:
        self.org_id, self.cost = org_id, cost
        self.request_id = f"req-{secrets.token_hex(8)}"
        self.created_us = int(started * 1_000_000)

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp(self.created_us / 1_000_000, UTC)

    def event(self) -> UsageEvent:
        assert self.cost is not None
        return UsageEvent(request_id=self.request_id, created_us=self.created_us, org_id=self.org_id, api_key_id=1,
                          model="m", provider="p", route_id=None, prompt_tokens=12, completion_tokens=7,
                          cost_micros=self.cost, price_id=None)


async def _log(db: asyncpg.Pool, *answers: Answer) -> None:
    """The request-log rows: token counts and cost exactly when billed (as proxy/relay.py records them)."""
    await db.executemany(
        """insert into request_logs (created_at, request_id, org_id, api_key_id, model, provider, path, method,
                                     status_code, latency_ms, prompt_tokens, completion_tokens, cost_micros)
           values ($1, $2, $3, 1, 'm', 'p', '/v1/chat/completions', 'POST', $4, 15, $5, $6, $7)""",
        [(a.created_at, a.request_id, a.org_id, 200 if a.cost is not None else 429,
          12 if a.cost is not None else None, 7 if a.cost is not None else None, a.cost) for a in answers])


async def _settle(redis: Redis, keys: RedisKeys, a: Answer, *, debit: bool = True, after_s: float = 1.0) -> None:
    """What settle.lua does for a billed answer: debit the live balance, append the event — here with the stream
    id it would have had `after_s` after the request started (None: now)."""
    org = keys.org(a.org_id)
    if debit:
        await redis.hincrby(org.balance, "balance", -a.cost)
    entry_id = "*" if after_s is None else f"{a.created_us // 1000 + int(after_s * 1000)}-0"
    await redis.xadd(org.stream, {"o": a.org_id, "c": a.cost, "d": _encode(a.event())}, id=entry_id)


async def _flush(settings: Settings, db: asyncpg.Pool, redis: Redis, count: int) -> None:
    flusher = BillingFlusher(settings, db, redis)
    task = asyncio.create_task(flusher.run())
    try:
        for _ in range(500):
            if flusher.flushed >= count or task.done():
                break
            await asyncio.sleep(0.02)
    finally:
        flusher.stop()
        await asyncio.wait_for(task, 10)
    assert flusher.flushed >= count


async def _records(db: asyncpg.Pool, a: Answer) -> list[asyncpg.Record]:
    return await db.fetch("select * from usage_records where request_id = $1", a.request_id)


async def test_lost_answers_are_billed_once_and_late_events_not_twice(own, redis: Redis) -> None:
    settings, db = own
    keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
    factory = Factory(db, redis, keys, settings)
    org, other = await factory.org(balance_micros=1_000_000), await factory.org(balance_micros=1_000_000)
    now = time.time()
    await ensure_partitions(db, "request_logs", datetime.fromtimestamp(now - 4 * GRACE_S, UTC),
                            datetime.fromtimestamp(now + 2 * GRACE_S, UTC))
    await rebuild_balance(db, BillingScripts(redis), keys, org)  # the live balance (rebuilt after the loss)

    # Started more than the grace ago, and the stream's oldest waiting event is younger than them by more.
    flushed = Answer(org, now - 2 * GRACE_S - 60, 200)  # its event reached PostgreSQL
    lost = Answer(org, now - 2 * GRACE_S - 50, 300)  # its event went with Redis's data
    refused = Answer(org, now - 2 * GRACE_S - 40, None)  # a 429: nothing billed
    held = Answer(other, now - 2 * GRACE_S - 40, 55)  # its event was held for repair (debited, no usage record)
    # Older than the grace, but its event has waited in the stream since (flusher stopped, PostgreSQL down).
    waiting = Answer(org, now - GRACE_S - 30, 70)
    recent = Answer(org, now - 20, 40)  # lost too, but younger than the grace: a settle may still be retrying
    await _log(db, lost, flushed, waiting, recent, refused, held)
    await _settle(redis, keys, flushed)
    await _flush(settings, db, redis, 1)
    await _settle(redis, keys, waiting)
    await db.execute(
        """insert into rejected_rows (kind, request_id, org_id, row_created_at, reason, shard, stream_id, payload,
                                      cost_micros) values ('usage_event', $1, $2, $3, 'NumericValueOutOfRange', 0,
                                      '1-1', $4, 55)""", held.request_id, other, held.created_at, _encode(held.event()))
    recovery = UsageRecovery(settings, db, redis)

    # The waiting event holds the bound back to its stream id - grace: `lost` is before it, `waiting` is not.
    assert await recovery.recover_once(now) == 1
    [record] = await _records(db, lost)
    assert (record["recovered"], record["cost_micros"], record["prompt_tokens"], record["completion_tokens"]) == (
        True, 300, 12, 7)
    txn = await db.fetchrow("select * from balance_transactions where id = $1", record["transaction_id"])
    assert (txn["kind"], txn["amount_micros"], txn["request_count"], txn["reason"]) == (
        "usage", -300, 1, RECOVERED_USAGE_REASON)
    assert [r["recovered"] for r in await _records(db, flushed)] == [False]
    assert not await _records(db, waiting) and not await _records(db, recent) and not await _records(db, held)

    # The lost event turns up after all (replayed into the stream) and the flusher writes the backlog: the
    # usage record's key dedupes it, so it is neither recorded nor debited again.
    await _settle(redis, keys, lost, debit=False, after_s=None)
    await _flush(settings, db, redis, 2)
    assert len(await _records(db, lost)) == 1 and len(await _records(db, waiting)) == 1
    assert await recovery.recover_once(now) == 0

    # Once past the grace, the recent lost answer is billed; the waiting one has its record; nothing twice.
    assert await recovery.recover_once(now + GRACE_S) == 1
    assert [r["recovered"] for r in await _records(db, recent)] == [True]
    assert await recovery.recover_once(now + GRACE_S) == 0
    # Even looking at everything again (no cursor; another worker) bills nothing more.
    await db.execute("delete from usage_recovery_cursors")
    assert await UsageRecovery(settings, db, redis).recover_once(now + GRACE_S) == 0
    assert recovery.recovered == 2

    assert not await _records(db, refused) and not await _records(db, held)
    assert await db.fetchval("select balance_micros from org_balances where org_id = $1", other) == 1_000_000
    assert await db.fetchval("select balance_micros from org_balances where org_id = $1", org) == 1_000_000 - 610
    # Ledger sum == balance == live balance, one usage record per billed answer, no drift.
    await assert_money_invariants(db, redis, settings, {org: OrgExpectation(billed=4)}, timeout=5)


async def test_no_recovery_while_the_stream_cannot_be_read(own, redis: Redis) -> None:
    """Redis unreachable: the events may be waiting there, so nothing is billed. Then billed, and the live
    balance rebuilt after it right."""
    settings, db = own
    unreachable = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    factory = Factory(db, redis, RedisKeys(settings.redis_prefix, 1), settings)
    org = await factory.org(balance_micros=1_000)
    now = time.time()
    await ensure_partitions(db, "request_logs", datetime.fromtimestamp(now - 2 * GRACE_S, UTC))
    lost = Answer(org, now - GRACE_S - 30, 100)
    await _log(db, lost)
    try:
        assert await UsageRecovery(settings, db, unreachable).recover_once(now) == 0
    finally:
        await unreachable.aclose()
    assert not await _records(db, lost)
    assert await UsageRecovery(settings, db, redis).recover_once(now) == 1
    # The org had no live balance (none rebuilt since the loss): the debit was parked, and the rebuild that
    # follows, whose snapshot holds it already, does not take it again.
    keys = RedisKeys(settings.redis_prefix, 1)
    assert await redis.hgetall(keys.org(org).pending_credits)
    await rebuild_balance(db, BillingScripts(redis), keys, org)
    await assert_money_invariants(db, redis, settings, {org: OrgExpectation(billed=1)}, timeout=5)
    assert int(await redis.hget(keys.org(org).balance, "balance")) == 900

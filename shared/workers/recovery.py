"""Usage recovery: bill, from the request log, the answers whose usage event Redis lost.

Settle debits the live balance and appends the usage event to the shard's stream in one script; the flusher
moves events into PostgreSQL later. When Redis loses its data (FLUSHALL, a restart without its append-only
file) the events not yet flushed are gone with it. Live balances are rebuilt from PostgreSQL, so no money is
created — but those answers were served and never charged, and have no usage record. The proxy's request log
(PostgreSQL, written apart from Redis) still has them: a row with token counts — the proxy records them
exactly when it settles a usage event (proxy/relay.py `_usage_event`) — and the cost charged. Every
`usage_recovery_interval_s` this worker finds such rows with no usage record and bills them through the
flusher's own ledger statement (shared/workers/usage_ledger.py), marked `recovered`.

When a row is missing its usage record *for good*, not merely for now (the hard part: billing an event that
is only late would bill it twice, since its settle already debited the live balance):

1. No settle for it can still be running: its request started more than `usage_recovery_grace_s` ago. A
   settle runs when the request ends and its retries stop before the reservation's lifetime is over, so the
   grace is at least `reservation_ttl_s` (enforced by the settings), plus a margin for clock skew between
   the proxies, Redis and this worker.
2. Its event cannot be waiting in the stream: the oldest entry of the shard's stream after the flusher's
   watermark (what PostgreSQL has not got yet) is younger than the request by more than the grace, or there
   is none. Then an event of the request, appended within the grace of its start, is older than every waiting
   entry: it was flushed (entries are flushed in stream order, and trimmed only after their commit), or lost.
   So a flusher that is slow, stopped, or waiting for PostgreSQL to come back holds the recovery back with it.
3. Flushed-but-not-recorded is excluded: the flusher holds an event PostgreSQL refuses in `rejected_rows`
   with its ledger debit but no usage record; such a request (and, for an event without a readable request
   id, any request of the org within the grace of it) is left alone.

And should a late flusher write meet a recovered record anyway, both go through `usage_ledger_sql`: the
usage record's key (created_at, request_id) — the request log's own, to the microsecond — makes the second
insert do nothing and debit nothing.

The recovered debit is also applied to the live balance, as a credit is (`apply_live_credit`: idempotent on
the transaction id; parked when the balance is missing, and a rebuild's snapshot knows these transactions) —
the live balance was rebuilt without the lost event's debit. A recovered record has what the request log
has: totals, cost, model, route, key, byok, estimated; not the token components, the price id, the uncharged
cost or the service tier, which only the event carried.

Per shard, a cursor in PostgreSQL (`usage_recovery_cursors`) says how far it has looked; each pass looks
again `_LATE_S` before it for request-log rows that reached PostgreSQL late (a proxy's buffer while
PostgreSQL was down). A shard's first pass starts at its bound (history is not searched). One pass per
shard at a time (an advisory lock), so any number of workers may run it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.billing import RECOVERED_USAGE_REASON, BillingScripts, apply_live_credit
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from shared.workers import sleep_unless_stopped, unexpected_error
from shared.workers.usage_ledger import usage_ledger_sql

__all__ = ["UsageRecovery"]

log = logging.getLogger("rocket_relay.recovery")

_LATE_S = 300.0  # request-log rows are looked for again this long behind the cursor (rows written late)
_MAX_WINDOW_S = 3600.0  # the most one pass of a shard looks at (a long-stopped worker catches up in steps)
_LOCK = 0x5252_5543  # "RRUC": advisory lock class of the recovery passes (the shard is the second key)

# $1 shard, $2 shards, $3 from, $4 to (request start times), $5 the grace in seconds.
_SOURCE = """
select r.created_at, r.request_id, r.org_id, r.api_key_id, coalesce(r.model, '') as model, r.provider,
       r.route_id, r.prompt_tokens, coalesce(r.completion_tokens, 0) as completion_tokens, r.cost_micros,
       null::bigint as price_id, r.byok, 0::bigint as uncharged_micros, 0 as cached_input_tokens,
       0 as cache_write_5m_tokens, 0 as cache_write_1h_tokens, 0 as reasoning_tokens, 0 as input_image_tokens,
       0 as input_audio_tokens, 0 as output_image_tokens, 0 as output_audio_tokens, null::text as service_tier,
       r.estimated
from request_logs r join org_balances b on b.org_id = r.org_id
where r.created_at >= $3 and r.created_at < $4 and r.org_id % $2 = $1
  and r.prompt_tokens is not null and r.cost_micros is not null
  and not exists (select 1 from usage_records u where u.created_at = r.created_at and u.request_id = r.request_id)
  and not exists (
      select 1 from rejected_rows h
      where h.kind = 'usage_event' and h.org_id = r.org_id
        and (h.request_id = r.request_id
             or ((h.request_id is null or h.request_id like 'undecodable-%')
                 and h.row_created_at between r.created_at - make_interval(secs => $5)
                                          and r.created_at + make_interval(secs => $5))))
"""
_RECOVER_SQL = usage_ledger_sql(_SOURCE, RECOVERED_USAGE_REASON, recovered=True)


class UsageRecovery:
    """Finds billed answers without a usage record in the request log and bills them once (see above)."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: Redis) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self._keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
        self._scripts = BillingScripts(redis)
        self._unapplied: list[asyncpg.Record] = []  # committed debits not yet applied to the live balance
        self.recovered = 0  # usage records recovered by this process (a running total, for metrics)

    async def run(self, stop: asyncio.Event) -> None:
        """A pass every `usage_recovery_interval_s` until `stop` is set."""
        while not stop.is_set():
            try:
                await self.recover_once()
            except (OSError, RedisError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("usage recovery pass failed (%s); the next one tries again", type(exc).__name__)
            except Exception as exc:  # e.g. redis-py's cluster client closing connections under it: carry on
                log.error("usage recovery pass failed (unexpected %s); the next one tries again",
                          unexpected_error(exc))
            await sleep_unless_stopped(stop, self._settings.usage_recovery_interval_s)

    async def recover_once(self, now: float | None = None) -> int:
        """One pass over every shard; returns how many usage records it recovered. `now`: unix time."""
        now = time.time() if now is None else now
        self._unapplied = await self._apply_live(self._unapplied)
        marks = {r["shard"]: f"{r['last_ms']}-{r['last_seq']}"
                 for r in await self._pool.fetch("select shard, last_ms, last_seq from billing_watermarks")}
        recovered = 0
        for shard in range(self._settings.billing_shards):
            try:
                bound = await self._bound(shard, marks.get(shard), now)
            except (OSError, RedisError) as exc:  # the stream can't be read: its events may be waiting there
                log.warning("usage recovery: shard %d skipped, its stream is unreadable (%s)", shard,
                            type(exc).__name__)
                continue
            debits = await self._recover_shard(shard, bound)
            if debits:
                count = sum(d["request_count"] for d in debits)
                recovered += count
                log.warning("usage recovery: %d billed answer(s) of shard %d had lost their usage event; billed "
                            "from the request log (%d µ$ over %d org(s))", count, shard,
                            -sum(d["amount_micros"] for d in debits), len(debits))
                self._unapplied += await self._apply_live(debits)
        self.recovered += recovered
        return recovered

    async def _bound(self, shard: int, watermark: str | None, now: float) -> float:
        """Requests of the shard started before this (unix time) can have no event still to come or waiting."""
        first = await self._redis.xrange(self._keys.stream(shard), min=f"({watermark}" if watermark else "-",
                                         max="+", count=1)
        waiting_since = now
        if first:
            entry_id = first[0][0]
            ms = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")[0]
            waiting_since = min(now, int(ms) / 1000)
        return waiting_since - self._settings.usage_recovery_grace_s

    async def _recover_shard(self, shard: int, bound: float) -> list[asyncpg.Record]:
        """Bill the shard's lost answers in [cursor - _LATE_S, bound) and move its cursor, in one transaction."""
        grace = self._settings.usage_recovery_grace_s
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("select pg_try_advisory_xact_lock($1, $2)", _LOCK, shard):
                return []  # another worker's pass has this shard
            checked = await conn.fetchval("select checked_to from usage_recovery_cursors where shard = $1", shard)
            start = checked.timestamp() if checked is not None else bound
            upto = min(bound, start + _MAX_WINDOW_S)
            since = start - _LATE_S
            if upto <= since:  # the bound went back (a backlog in the stream): wait for it
                return []
            frm, to = datetime.fromtimestamp(since, UTC), datetime.fromtimestamp(upto, UTC)
            await conn.fetchval("select rr_ensure_partitions_for('usage_records', $1::timestamptz[])", [frm, to])
            debits = await conn.fetch(_RECOVER_SQL, shard, self._settings.billing_shards, frm, to, grace)
            await conn.execute(
                """insert into usage_recovery_cursors (shard, checked_to) values ($1, $2)
                   on conflict (shard) do update set checked_to = greatest(usage_recovery_cursors.checked_to,
                                                                          excluded.checked_to), updated_at = now()""",
                shard, datetime.fromtimestamp(max(start, upto), UTC))
        return debits

    async def _apply_live(self, debits: list[asyncpg.Record]) -> list[asyncpg.Record]:
        """Apply committed recovered debits to the live balances; returns those Redis refused, for the next
        pass (idempotent on the transaction id, so one applied before a failure is not applied twice)."""
        for i, d in enumerate(debits):
            try:
                await apply_live_credit(self._scripts, self._keys, d["org_id"], d["id"], d["amount_micros"])
            except (OSError, RedisError) as exc:
                log.error("usage recovery: %d debit(s) not applied to live balances yet (%s); retried next pass",
                          len(debits) - i, type(exc).__name__)
                return debits[i:]
        return []

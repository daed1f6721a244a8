"""The billing flusher: drains the billing streams into the PostgreSQL ledger.

Per stream shard, one lease holder at a time (any number of worker processes may run; they share the
shards). The holder first adopts every pending entry of earlier consumers (XAUTOCLAIM: a dead flusher's
batch), then reads new entries. Each batch is written in one transaction:

    COPY events -> temp staging table
    insert usage_records ... on conflict (created_at, request_id) do nothing   -- replays change nothing
    one 'usage' balance_transaction per org for the rows actually inserted      -- the ledger effect
    org_balances -= those amounts
    billing_watermarks[shard] = last stream id of the batch

and only then acknowledged. A crash before the commit leaves the entries pending (re-read, written once);
a crash after the commit and before the ACK re-reads them and inserts nothing. PostgreSQL down: the batch
is retried with backoff while the entries wait in the stream. Entries are processed in stream order, so
the watermark says "everything up to here is in PostgreSQL, nothing after" — what balance rebuilds use,
and what the usage recovery (shared/workers/recovery.py) waits for before it bills, from the request log, an
answer whose event Redis lost. Both write through one statement (shared/workers/usage_ledger.py), so a
usage record either of them inserted first makes the other's insert, and its debit, nothing.

Poison events. An event that decodes but that PostgreSQL refuses (a NUL in its model string, a token count
out of range, an org deleted since) would fail its batch forever and stop the shard: no event after it would
reach the ledger. `shared.db.staged_copy.write_staged` finds it by bisecting the batch in savepoints; the
rest is written, and the poison event is *held*, never dropped: its raw stream entry goes into
`rejected_rows` (kind 'usage_event', unique per shard and stream id, so a replay holds it once) in the same
transaction as the batch and the watermark, and the entries are acknowledged only after that commit.

Money stays consistent. Settle already debited the event's cost from the live Redis balance, and the
watermark moves past the held event, so a balance rebuild would no longer subtract it as un-flushed: if the
ledger missed it too, a rebuild would hand the cost back. So a held event still gets its ledger effect — one
'usage' balance transaction of -cost for its org (reason 'usage held for repair', referenced by the held
row's `transaction_id`) with org_balances updated — and only its usage record waits for repair (whoever
repairs it inserts the usage record with that transaction_id and sets `resolved_at`). When even that debit
is refused (the org no longer exists, the cost is out of range), the event is held with no transaction_id:
`rr-reconcile` reports every unresolved held event, and platform admins list them (`GET
/v1/admin/rejected-rows`). The watermark thus means "everything up to here is in PostgreSQL: in the ledger,
or held for repair in rejected_rows".

An event whose payload does not decode is held the same way, with the org and cost the settle script wrote
beside it (and its ledger effect); only an entry without those goes to the `<stream>:dead` dead-letter stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from shared import failpoints
from shared.billing import UsageEvent
from shared.budgets import BudgetCalendar
from shared.db.staged_copy import Rejected, StagedTable, write_staged
from shared.notify.alerts import check_balance_alerts
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from shared.workers import sleep_unless_stopped, unexpected_error
from shared.workers.budget_alerts import emit_budget_events
from shared.workers.usage_ledger import USAGE_COLUMNS, usage_ledger_sql

__all__ = ["BillingFlusher"]

log = logging.getLogger("rocket_relay.flusher")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_decode_event = msgspec.msgpack.Decoder(UsageEvent).decode
# The billed components of an event (shared.billing.UsageEvent), as usage_records columns of the same name.
_COMPONENT_COLUMNS = ("cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "reasoning_tokens",
                      "input_image_tokens", "input_audio_tokens", "output_image_tokens", "output_audio_tokens",
                      "service_tier", "estimated")
_STAGE_COLUMNS = USAGE_COLUMNS
_STAGE_DDL = """create temp table if not exists usage_stage (
    created_at timestamptz, request_id text, org_id bigint, api_key_id bigint, model text, provider text,
    route_id bigint, prompt_tokens integer, completion_tokens integer, cost_micros bigint, price_id bigint,
    byok boolean, uncharged_micros bigint, cached_input_tokens integer, cache_write_5m_tokens integer,
    cache_write_1h_tokens integer, reasoning_tokens integer, input_image_tokens integer, input_audio_tokens integer,
    output_image_tokens integer, output_audio_tokens integer, service_tier text, estimated boolean)
    on commit delete rows"""
_HOLD_SQL = """
insert into rejected_rows (kind, request_id, org_id, row_created_at, sqlstate, reason, shard, stream_id, payload,
                           cost_micros)
values ('usage_event', $1, $2, $3, $4, $5, $6, $7, $8, $9)
on conflict (shard, stream_id) where kind = 'usage_event' do nothing
returning id
"""
# The ledger effect of a held event (see the module docstring): what settle already took from the live balance.
_HELD_DEBIT_SQL = """
with txn as (
    insert into balance_transactions (org_id, kind, amount_micros, request_count, reason)
    values ($1, 'usage', -$2::bigint, 1, 'usage held for repair') returning id, org_id, amount_micros
), bal as (
    update org_balances b set balance_micros = b.balance_micros + t.amount_micros, updated_at = now()
    from txn t where b.org_id = t.org_id
)
update rejected_rows set transaction_id = (select id from txn) where id = $3
"""
# The ledger path shared with the usage recovery (shared/workers/usage_ledger.py).
_WRITE_SQL = usage_ledger_sql("select * from usage_stage", "usage")
_TABLE = StagedTable("usage_records", "usage_stage", _STAGE_DDL, _STAGE_COLUMNS, _WRITE_SQL)
_WATERMARK_SQL = """
insert into billing_watermarks (shard, last_ms, last_seq) values ($1, $2, $3)
on conflict (shard) do update set
    last_ms = greatest(billing_watermarks.last_ms, excluded.last_ms),
    last_seq = case
        when (excluded.last_ms, excluded.last_seq) > (billing_watermarks.last_ms, billing_watermarks.last_seq)
        then excluded.last_seq else billing_watermarks.last_seq end,
    updated_at = now()
"""
# Renew our lease only if it is still ours (another holder may have taken over after we stalled).
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_TRIM_KEEP_MS = 120_000  # acknowledged entries stay this long, for rebuilds racing a flush


class LeaseLost(Exception):
    pass


def _id_parts(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


class BillingFlusher:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: Redis) -> None:
        self._settings = settings
        self._pool = pool
        self._redis = redis
        self._keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
        self._calendar = BudgetCalendar(ZoneInfo(settings.budget_timezone))
        self._renew = redis.register_script(_RENEW_LUA)
        self._consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._stopping = asyncio.Event()
        self.flushed = 0
        self.held = 0  # events PostgreSQL refused, held for repair in rejected_rows

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Serve every shard until `stop()`; each shard loop competes for that shard's lease."""
        await asyncio.gather(*(self._serve_shard(s) for s in range(self._settings.billing_shards)))

    async def _serve_shard(self, shard: int) -> None:
        lease_key = self._keys.flusher_lease(shard)
        lease_ms = self._settings.flusher_lease_ms
        while not self._stopping.is_set():
            token = f"{self._consumer}-{os.urandom(4).hex()}"
            try:
                if await self._redis.set(lease_key, token, nx=True, px=lease_ms):
                    try:
                        await self._drain(shard, token)
                    finally:
                        if await self._redis.get(lease_key) == token.encode():
                            await self._redis.delete(lease_key)
                else:
                    await self._sleep(lease_ms / 3000)
            except LeaseLost:
                log.warning("shard %d: lease lost; re-acquiring", shard)
            except (RedisError, RedisClusterException, OSError) as exc:  # the last: no cluster node reached
                log.warning("shard %d: Redis unavailable (%s)", shard, type(exc).__name__)
                await self._sleep(1.0)
            except Exception as exc:
                # Never let a shard's loop die while the process lives on: its stream would not be flushed again
                # and nothing would say so. redis-py's cluster client, closing its connections under in-flight
                # commands (CLUSTERDOWN, a lost slot), fails them with RuntimeError or AttributeError.
                log.error("shard %d: unexpected %s; retrying", shard, unexpected_error(exc))
                await self._sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        await sleep_unless_stopped(self._stopping, seconds)

    async def _hold(self, shard: int, token: str) -> None:
        if not await self._renew(keys=[self._keys.flusher_lease(shard)], args=[token, self._settings.flusher_lease_ms]):
            raise LeaseLost

    async def _drain(self, shard: int, token: str) -> None:
        stream = self._keys.stream(shard)
        group = RedisKeys.BILLING_GROUP
        try:
            await self._redis.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        batch = self._settings.flusher_batch_size
        # 1. Adopt what earlier consumers read but never acknowledged, oldest first.
        start = "0-0"
        while not self._stopping.is_set():
            next_start, entries, *_ = await self._redis.xautoclaim(stream, group, self._consumer, 0, start,
                                                                   count=batch)
            if entries:
                await self._flush(shard, token, stream, entries)
            if next_start in (b"0-0", "0-0"):
                break
            start = next_start
        # 2. New entries, as they come, but a shard is read at most once per interval unless it has a backlog:
        # flushing every event the moment it arrives would pay a transaction and four Redis calls per event.
        # 3. Once stopping: what the stream still holds is written before the holder lets go (non-blocking
        # reads until one comes back empty), so stopping a deployment — or `make run` — strands no charge.
        interval_s = self._settings.flusher_interval_ms / 1000
        read_at, full = 0.0, False
        while True:
            stopping = self._stopping.is_set()
            if not stopping and not full and (wait := read_at + interval_s - time.monotonic()) > 0:
                await self._sleep(wait)
                stopping = self._stopping.is_set()
            await self._hold(shard, token)
            read_at = time.monotonic()
            reply = await self._redis.xreadgroup(group, self._consumer, {stream: ">"}, count=batch,
                                                 block=None if stopping else self._settings.flusher_block_ms)
            full, read = False, 0
            for _, entries in reply or ():
                if entries:
                    full, read = len(entries) >= batch, read + len(entries)
                    await self._flush(shard, token, stream, entries)
            if stopping and not read:
                return

    async def _flush(self, shard: int, token: str, stream: str, entries: list) -> None:
        rows: list[tuple] = []
        ids: list = []
        held: list[_Held] = []  # events that cannot be written as usage records
        source: dict[int, _Held] = {}  # id(row) -> its entry, for rows that PostgreSQL may refuse
        for entry_id, fields in entries:
            ids.append(entry_id)
            if not fields:  # deleted while pending (trimmed): nothing to write
                continue
            try:
                e = _decode_event(fields[b"d"])
            except (msgspec.DecodeError, KeyError):
                # The settle script wrote the org and the cost it debited beside the payload: enough to hold the
                # event with its ledger effect, like a refused one. Without them it cannot be attributed.
                stand_in = _stand_in(entry_id, fields)
                if stand_in is None:
                    log.error("shard %d: undecodable billing event %s kept in the dead-letter stream", shard,
                              entry_id)
                    await self._redis.xadd(stream + ":dead", {k: v for k, v in fields.items()})
                    continue
                log.error("shard %d: undecodable billing event %s held for repair", shard, entry_id)
                held.append(_Held(_text_id(entry_id), fields.get(b"d", b""), stand_in).refused(None, "Undecodable"))
                continue
            entry = _Held(_text_id(entry_id), fields[b"d"], e)
            try:
                created_at = _EPOCH + timedelta(microseconds=e.created_us)  # exact: as the request log's
            except (OverflowError, ValueError, OSError) as exc:  # a time no datetime can hold
                held.append(entry.refused(None, type(exc).__name__))
                continue
            row = (created_at, e.request_id, e.org_id, e.api_key_id, e.model, e.provider, e.route_id,
                   e.prompt_tokens, e.completion_tokens, e.cost_micros, e.price_id, e.byok, e.uncharged_micros,
                   *(getattr(e, c) for c in _COMPONENT_COLUMNS))
            rows.append(row)
            source[id(row)] = entry
        last_ms, last_seq = _id_parts(ids[-1] if isinstance(ids[-1], bytes) else ids[-1].encode())
        delay = 0.2
        while True:
            await self._hold(shard, token)
            try:
                kept = await self._write(rows, held, source, shard, last_ms, last_seq)
                break
            except Exception as exc:  # PostgreSQL down or unreachable (poison events never get here)
                log.warning("shard %d: writing %d events failed (%s); retrying", shard, len(rows),
                            type(exc).__name__)
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)
                if self._stopping.is_set():
                    return  # left pending: the next holder writes it
        failpoints.hit(self._settings.failpoint, failpoints.FLUSHER_AFTER_COMMIT)
        await self._redis.xack(stream, RedisKeys.BILLING_GROUP, *ids)
        keep_from = min(last_ms, int(time.time() * 1000) - _TRIM_KEEP_MS)
        await self._redis.xtrim(stream, minid=f"{keep_from}-0", approximate=True)
        self.flushed += len(rows) + len(held) - len(kept)
        if kept:
            self.held += len(kept)
            # Stream ids and error classes only: the event's strings are what PostgreSQL refused.
            log.error("shard %d: %d billing event(s) refused by PostgreSQL held for repair in rejected_rows "
                      "(%s); the rest of the batch was written", shard, len(kept),
                      ", ".join(f"{h.stream_id}: {h.reason}" for h in kept))

    async def _write(self, rows: list[tuple], held: list[_Held], source: dict[int, _Held], shard: int,
                     last_ms: int, last_seq: int) -> list[_Held]:
        """Write the batch, hold what PostgreSQL refuses, move the watermark: one transaction. Returns the
        events held."""
        failpoints.hit(self._settings.failpoint, failpoints.FLUSHER_BEFORE_COPY)
        kept: list[_Held] = []

        async def finish(conn: asyncpg.Connection, rejected: list[Rejected]) -> None:
            failpoints.hit(self._settings.failpoint, failpoints.FLUSHER_AFTER_COPY)
            kept[:] = [*held, *(source[id(r.row)].refused(r.sqlstate, r.reason) for r in rejected)]
            for h in kept:
                await _keep(conn, h, shard)
            await conn.execute(_WATERMARK_SQL, shard, last_ms, last_seq)
            await self._budget_events(conn, {row[2] for row in rows})
            # Balance alerts of the orgs this batch debited: detected here, off the request path, once per
            # crossing (the batch holds these orgs' balance rows locked; see shared/notify/alerts.py).
            # A failure here must never stop billing: the alerts are checked in a savepoint, and a refusal
            # only costs this batch's check (the next batch or ledger entry of the org checks again).
            try:
                async with conn.transaction():
                    await check_balance_alerts(conn, {r[2] for r in rows} | {h.event.org_id for h in kept})
            except asyncpg.PostgresError as exc:
                log.error("shard %d: balance alert check failed (%s)", shard, type(exc).__name__)

        async with self._pool.acquire() as conn:
            await write_staged(conn, _TABLE, rows, finish=finish)
        return kept


    async def _budget_events(self, conn: asyncpg.Connection, org_ids: set[int]) -> None:
        """Budget crossings of the batch's orgs, committed with the batch (shared.workers.budget_alerts). In a
        savepoint: an alert that cannot be written must never hold back the ledger."""
        try:
            async with conn.transaction():
                await emit_budget_events(conn, org_ids, time.time(), self._calendar)
        except asyncpg.PostgresError as exc:
            log.error("budget events of a batch could not be written (%s); the next batch retries",
                      type(exc).__name__)


class _Held:
    """A stream entry being held for repair: its id, raw payload, decoded event and why it was refused."""

    __slots__ = ("event", "payload", "reason", "sqlstate", "stream_id")

    def __init__(self, stream_id: str, payload: bytes, event: UsageEvent) -> None:
        self.stream_id, self.payload, self.event = stream_id, payload, event
        self.sqlstate: str | None = None
        self.reason = ""

    def refused(self, sqlstate: str | None, reason: str) -> _Held:
        self.sqlstate, self.reason = sqlstate, reason
        return self


def _stand_in(entry_id: bytes | str, fields: dict) -> UsageEvent | None:
    """An event for an undecodable entry, from the org and cost settle wrote beside it (None: not there)."""
    try:
        org_id, cost = int(fields[b"o"]), int(fields[b"c"])
    except (KeyError, ValueError):
        return None
    ms, _ = _id_parts(entry_id if isinstance(entry_id, bytes) else entry_id.encode())
    return UsageEvent(request_id=f"undecodable-{_text_id(entry_id)}", created_us=ms * 1000, org_id=org_id,
                      api_key_id=0, model="", provider=None, route_id=None, prompt_tokens=0, completion_tokens=0,
                      cost_micros=cost, price_id=None)


def _text_id(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def _bigint(value: object) -> int | None:
    return value if isinstance(value, int) and -(2**63) <= value < 2**63 else None


async def _keep(conn: asyncpg.Connection, h: _Held, shard: int) -> None:
    """Hold one event in rejected_rows and, if it is new there, give it its ledger effect (in a savepoint:
    when even the debit is refused, the event is still held, with no transaction)."""
    e = h.event
    rid = e.request_id if e.request_id.isprintable() and len(e.request_id) <= 200 else None
    try:
        created = _EPOCH + timedelta(microseconds=e.created_us)
    except (OverflowError, ValueError, OSError):
        created = None
    org_id, cost = _bigint(e.org_id), _bigint(e.cost_micros)
    held_id = await conn.fetchval(_HOLD_SQL, rid, org_id, created, h.sqlstate, h.reason, shard, h.stream_id,
                                  h.payload, cost)
    if held_id is None or org_id is None or cost is None:
        return  # held before (a replayed batch: its debit is in already), or nothing that can be debited
    try:
        async with conn.transaction():
            await conn.execute(_HELD_DEBIT_SQL, org_id, cost, held_id)
    except asyncpg.IntegrityConstraintViolationError as exc:  # e.g. the org was deleted since
        log.error("shard %d: held billing event %s could not be debited (%s): the ledger misses it",
                  shard, h.stream_id, type(exc).__name__)

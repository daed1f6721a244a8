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
the watermark says "everything up to here is in PostgreSQL, nothing after" — what balance rebuilds use.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import UTC, datetime

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from shared import failpoints
from shared.billing import UsageEvent
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from shared.workers import sleep_unless_stopped

__all__ = ["BillingFlusher"]

log = logging.getLogger("rocket_relay.flusher")
_decode_event = msgspec.msgpack.Decoder(UsageEvent).decode
_STAGE_COLUMNS = ("created_at", "request_id", "org_id", "api_key_id", "model", "provider", "route_id",
                  "prompt_tokens", "completion_tokens", "cost_micros", "price_id", "byok", "uncharged_micros")
_STAGE_DDL = """create temp table if not exists usage_stage (
    created_at timestamptz, request_id text, org_id bigint, api_key_id bigint, model text, provider text,
    route_id bigint, prompt_tokens integer, completion_tokens integer, cost_micros bigint, price_id bigint,
    byok boolean, uncharged_micros bigint) on commit delete rows"""
_WRITE_SQL = """
with txn as (
    select org_id, nextval(pg_get_serial_sequence('balance_transactions', 'id')) as id
    from (select distinct org_id from usage_stage) o
), ins as (
    insert into usage_records (created_at, request_id, org_id, api_key_id, model, provider, route_id,
                               prompt_tokens, completion_tokens, cost_micros, price_id, byok, uncharged_micros,
                               transaction_id)
    select s.created_at, s.request_id, s.org_id, s.api_key_id, s.model, s.provider, s.route_id,
           s.prompt_tokens, s.completion_tokens, s.cost_micros, s.price_id, s.byok, s.uncharged_micros, t.id
    from usage_stage s join txn t using (org_id)
    on conflict do nothing
    returning org_id, transaction_id, cost_micros
), agg as (
    select org_id, transaction_id, sum(cost_micros)::bigint as total, count(*)::int as n from ins group by 1, 2
), ledger as (
    insert into balance_transactions (id, org_id, kind, amount_micros, request_count, reason)
    select transaction_id, org_id, 'usage', -total, n, 'usage' from agg
    returning org_id, amount_micros
)
update org_balances b set balance_micros = b.balance_micros + l.amount_micros, updated_at = now()
from ledger l where b.org_id = l.org_id
"""
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
        self._renew = redis.register_script(_RENEW_LUA)
        self._consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._stopping = asyncio.Event()
        self.flushed = 0

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
            except (RedisError, OSError) as exc:
                log.warning("shard %d: Redis unavailable (%s)", shard, type(exc).__name__)
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
        interval_s = self._settings.flusher_interval_ms / 1000
        read_at, full = 0.0, False
        while not self._stopping.is_set():
            if not full and (wait := read_at + interval_s - time.monotonic()) > 0:
                await self._sleep(wait)
            await self._hold(shard, token)
            read_at = time.monotonic()
            reply = await self._redis.xreadgroup(group, self._consumer, {stream: ">"}, count=batch,
                                                 block=self._settings.flusher_block_ms)
            full = False
            for _, entries in reply or ():
                if entries:
                    full = len(entries) >= batch
                    await self._flush(shard, token, stream, entries)

    async def _flush(self, shard: int, token: str, stream: str, entries: list) -> None:
        rows, ids = [], []
        for entry_id, fields in entries:
            ids.append(entry_id)
            if not fields:  # deleted while pending (trimmed): nothing to write
                continue
            try:
                e = _decode_event(fields[b"d"])
            except (msgspec.DecodeError, KeyError):
                log.error("shard %d: undecodable billing event %s kept in the dead-letter stream", shard, entry_id)
                await self._redis.xadd(stream + ":dead", {k: v for k, v in fields.items()})
                continue
            rows.append((datetime.fromtimestamp(e.created_us / 1_000_000, UTC), e.request_id, e.org_id,
                         e.api_key_id, e.model, e.provider, e.route_id, e.prompt_tokens, e.completion_tokens,
                         e.cost_micros, e.price_id, e.byok, e.uncharged_micros))
        last_ms, last_seq = _id_parts(ids[-1] if isinstance(ids[-1], bytes) else ids[-1].encode())
        delay = 0.2
        while True:
            await self._hold(shard, token)
            try:
                await self._write(rows, shard, last_ms, last_seq)
                break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
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
        self.flushed += len(rows)

    async def _write(self, rows: list[tuple], shard: int, last_ms: int, last_seq: int) -> None:
        failpoints.hit(self._settings.failpoint, failpoints.FLUSHER_BEFORE_COPY)
        async with self._pool.acquire() as conn:
            for attempt in (1, 2):
                try:
                    async with conn.transaction():
                        await conn.execute(_STAGE_DDL)
                        if rows:
                            await conn.copy_records_to_table("usage_stage", records=rows, columns=_STAGE_COLUMNS)
                            failpoints.hit(self._settings.failpoint, failpoints.FLUSHER_AFTER_COPY)
                            await conn.execute(_WRITE_SQL)
                        await conn.execute(_WATERMARK_SQL, shard, last_ms, last_seq)
                    return
                except asyncpg.PostgresError as exc:
                    if attempt == 1 and "no partition" in str(exc):
                        await conn.execute("select rr_ensure_month_partitions('usage_records', 2)")
                        continue
                    raise

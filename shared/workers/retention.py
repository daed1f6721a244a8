"""Retention: what `rr-worker` removes from PostgreSQL, and when.

One pass, every `RR_RETENTION_INTERVAL_S`:

1. Drops the monthly partitions whose whole range is older than the window of their table: request_logs
   past `RR_LOG_RETENTION_MAX_DAYS` (no org may keep its logs longer), usage_records (billing evidence)
   past `RR_USAGE_RETENTION_DAYS`. The SQL function `rr_drop_expired_partitions` reads the bounds from the
   catalog and never touches the current or a future month.

Every cutoff is computed from one `now` taken from Python's clock at the start of the pass (or passed in)
and handed to SQL, never from PostgreSQL's now(): a test can fix the clock, e.g. at a month's last second.
2. Deletes each org's request_logs rows older than its own retention (`orgs.request_log_retention_days`,
   or `RR_LOG_RETENTION_DEFAULT_DAYS` when null; rows of no org follow the default), in statements of at
   most `RR_RETENTION_BATCH_SIZE` rows with a short pause between them, so no statement holds its row locks
   or a long snapshot for long.

3. Deletes webhook delivery records older than `RR_WEBHOOK_DELIVERY_RETENTION_DAYS` and mail records older than
   `RR_MAIL_RETENTION_DAYS`, in batches of the same size.

Each request-log delete addresses one partition whose range starts before the org's cutoff — the partitions are pruned
by the time predicate before any row is read — and picks its rows through request_logs' (org_id,
created_at) index, then deletes them by ctid. One statement joining the parent table to "the next N rows"
would let the planner hash-join, re-reading every expired row of the org for each batch.

Any number of workers may run: one pass at a time holds a session advisory lock, the others skip theirs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from shared.settings import Settings
from shared.workers import sleep_unless_stopped

__all__ = ["RetentionResult", "enforce_retention", "run_retention_pass"]

log = logging.getLogger("rocket_relay.retention")

# Pause after a full batch before the next one: other writers and vacuum get their turn.
BATCH_PAUSE_S = 0.05
# Dropping a partition locks its parent exclusively. Rather than queue the proxies' log writes behind a
# long-running reader, give up after this and try again at the next pass.
PARTITION_LOCK_TIMEOUT = "5s"
_PASS_LOCK_SQL = "hashtext('rr_retention_pass')"
_TRANSIENT = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(slots=True)
class RetentionResult:
    """What one pass removed (counts only: nothing about whose rows they were)."""

    partitions_dropped: dict[str, int] = field(default_factory=dict)  # by parent table
    rows_deleted: int = 0  # request_logs rows removed by the per-org deletes
    orgs_trimmed: int = 0  # orgs that lost rows to those deletes
    batches: int = 0  # delete statements that removed rows
    notification_rows_deleted: int = 0  # webhook_deliveries and mail_messages rows past their windows
    completed: bool = True  # false: stopped early (worker shutting down)


async def run_retention_pass(pool: asyncpg.Pool, settings: Settings, *, stop: asyncio.Event | None = None,
                             wait: bool = False, batch_pause_s: float = BATCH_PAUSE_S,
                             now: datetime | None = None) -> RetentionResult | None:
    """One retention pass as of `now` (default: Python's clock, which time-machine moves in tests; the
    database's now() is never used for the cutoffs). Returns None without doing anything when another pass
    holds the lock (unless `wait`, which waits for it). Stops between two statements once `stop` is set."""
    now = now or datetime.now(UTC)
    async with pool.acquire() as conn:
        if wait:
            await conn.execute(f"select pg_advisory_lock({_PASS_LOCK_SQL})")
        elif not await conn.fetchval(f"select pg_try_advisory_lock({_PASS_LOCK_SQL})"):
            return None
        try:
            return await _pass(conn, settings, stop or asyncio.Event(), batch_pause_s, now)
        finally:
            try:
                await conn.execute(f"select pg_advisory_unlock({_PASS_LOCK_SQL})")
            except _TRANSIENT:
                pass  # a broken connection has lost its session lock already; the pool resets the others


async def _pass(conn: asyncpg.Connection, settings: Settings, stop: asyncio.Event,
                pause_s: float, now: datetime) -> RetentionResult:
    result = RetentionResult()
    for parent, keep_days in (("request_logs", settings.log_retention_max_days),
                              ("usage_records", settings.usage_retention_days)):
        result.partitions_dropped[parent] = await _drop_expired_partitions(conn, parent, keep_days, now)

    partitions = await conn.fetch(
        "select partition::text as name, lower_bound from rr_month_partitions('request_logs')")
    targets: list[tuple[int | None, int]] = [
        (r["id"], settings.effective_log_retention_days(r["request_log_retention_days"]))
        for r in await conn.fetch("select id, request_log_retention_days from orgs order by id")
    ]
    targets.append((None, settings.log_retention_default_days))  # rows of no org (e.g. unknown keys)
    for org_id, days in targets:
        if stop.is_set() or not result.completed:
            result.completed = False
            break
        cutoff = now - timedelta(days=days)
        deleted = await _delete_older_rows(conn, org_id, cutoff, partitions, settings.retention_batch_size,
                                           pause_s, stop, result)
        result.rows_deleted += deleted
        result.orgs_trimmed += 1 if deleted and org_id is not None else 0
    for table, days in (("webhook_deliveries", settings.webhook_delivery_retention_days),
                        ("mail_messages", settings.mail_retention_days)):
        if stop.is_set() or not result.completed:
            result.completed = False
            break
        result.notification_rows_deleted += await _delete_old_records(
            conn, table, now - timedelta(days=days), settings.retention_batch_size, pause_s, stop)
    return result


async def _delete_old_records(conn: asyncpg.Connection, table: str, cutoff: datetime, batch_size: int,
                              pause_s: float, stop: asyncio.Event) -> int:
    """Delete rows of `table` created before `cutoff` (by its created_at index), batch by batch."""
    deleted = 0
    while not stop.is_set():
        status = await conn.execute(
            f"delete from {table} where id = any(array(select id from {table} where created_at < $1 "
            f"order by created_at limit {batch_size:d}))", cutoff)
        count = int(status.rsplit(" ", 1)[1])
        deleted += count
        if count < batch_size:
            break
        await asyncio.sleep(pause_s)
    return deleted


async def _drop_expired_partitions(conn: asyncpg.Connection, parent: str, keep_days: int, now: datetime) -> int:
    try:
        async with conn.transaction():
            await conn.execute(f"set local lock_timeout = '{PARTITION_LOCK_TIMEOUT}'")
            return await conn.fetchval("select rr_drop_expired_partitions($1, $2, $3)", parent, keep_days, now)
    except asyncpg.LockNotAvailableError:
        log.warning("retention: %s is busy; its expired partitions are dropped at the next pass", parent)
        return 0


async def _delete_older_rows(conn: asyncpg.Connection, org_id: int | None, cutoff: datetime,
                             partitions: list[asyncpg.Record], batch_size: int, pause_s: float,
                             stop: asyncio.Event, result: RetentionResult) -> int:
    """Delete the rows of `org_id` (None: rows of no org) created before `cutoff`, batch by batch."""
    match, args = ("org_id is null", (cutoff,)) if org_id is None else ("org_id = $2", (cutoff, org_id))
    # One index probe per org (most have nothing to delete on most passes).
    if not await conn.fetchval(
            f"select exists (select 1 from request_logs where created_at < $1 and {match})", *args):
        return 0
    deleted = 0
    for part in partitions:
        if part["lower_bound"] is not None and part["lower_bound"] >= cutoff:
            continue  # wholly inside the window: nothing of it expires
        # The name comes from the catalog as regclass text, quoted where it needs to be.
        sql = (f"delete from {part['name']} where ctid = any(array("
               f"select ctid from {part['name']} where created_at < $1 and {match} limit {batch_size:d}))")
        while True:
            try:
                status = await conn.execute(sql, *args)
            except asyncpg.UndefinedTableError:
                break  # dropped meanwhile (by hand): its rows are gone anyway
            count = int(status.rsplit(" ", 1)[1])
            if count:
                deleted += count
                result.batches += 1
            if count < batch_size:
                break
            if stop.is_set():
                result.completed = False
                return deleted
            await asyncio.sleep(pause_s)
    return deleted


async def enforce_retention(pool: asyncpg.Pool, settings: Settings, stop: asyncio.Event) -> None:
    """The worker loop: a pass now and then every `retention_interval_s` until `stop` is set. A failed pass
    (database unreachable, a timeout) is logged and retried at the next interval; it never ends the loop."""
    while not stop.is_set():
        started = time.monotonic()
        try:
            result = await run_retention_pass(pool, settings, stop=stop)
        except _TRANSIENT as exc:
            log.warning("retention pass failed (%s); retrying in %.0f s", type(exc).__name__,
                        settings.retention_interval_s)
        except Exception:
            log.exception("retention pass failed unexpectedly; retrying in %.0f s", settings.retention_interval_s)
        else:
            if result is None:
                log.info("retention pass skipped: another worker is running one")
            else:
                log.info("retention pass%s: dropped %d request_logs and %d usage_records partitions, "
                         "deleted %d request-log rows of %d orgs in %d batches and %d notification records, %.1f s",
                         "" if result.completed else " (interrupted)",
                         result.partitions_dropped.get("request_logs", 0),
                         result.partitions_dropped.get("usage_records", 0), result.rows_deleted,
                         result.orgs_trimmed, result.batches, result.notification_rows_deleted,
                         time.monotonic() - started)
        await sleep_unless_stopped(stop, settings.retention_interval_s)

"""`rr-worker`: the background workers of one process — the billing flusher, the usage recovery (billed
answers whose usage event Redis lost, billed from the request log; see shared/workers/recovery.py), the
partition manager, retention (expired partitions dropped, request logs past each org's retention deleted
in batches), the model-quality probe runner (`RR_PROBE_ENABLED`; see shared/workers/probes.py), payments
(Stripe events left behind by a webhook request, live credits a dead process never applied) and
notifications (`RR_NOTIFY_ENABLED`: org events out to signed webhooks and mail; see shared/workers/notify.py).

Stateless apart from PostgreSQL and Redis: run as many copies as you like; the flusher's shard leases
keep them from stepping on each other, and one retention pass (and one recovery pass per shard) runs at a
time. SIGTERM/SIGINT stop it after the batch in hand.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from datetime import UTC, datetime

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from shared.logs import configure_logging
from shared.redis_client import connect_redis, load_slot_map
from shared.redis_keys import RedisKeys
from shared.settings import Settings, SettingsError, load_settings
from shared.workers import sleep_unless_stopped
from shared.workers.flusher import BillingFlusher
from shared.workers.metrics import WorkerMetrics
from shared.workers.notify import run_notify
from shared.workers.payments import process_payments
from shared.workers.probes import ProbeRunner
from shared.workers.recovery import UsageRecovery
from shared.workers.retention import enforce_retention

log = logging.getLogger("rocket_relay.worker")

PARTITION_CHECK_INTERVAL_S = 3600.0
PARTITION_MONTHS_AHEAD = 2


async def ensure_partitions_ahead(pool: asyncpg.Pool, now: datetime | None = None) -> int:
    """Create the partitions of this month and the next `PARTITION_MONTHS_AHEAD` months of both partitioned
    tables that are missing; returns how many. "This month" is Python's clock (`now`), not the database's,
    so it is the writers' month and a test can fix it."""
    now = now or datetime.now(UTC)
    created = 0
    for table in ("request_logs", "usage_records"):
        created += await pool.fetchval("select rr_ensure_month_partitions_from($1, $2, $3)", table, now,
                                       PARTITION_MONTHS_AHEAD)
    return created


async def manage_partitions(pool: asyncpg.Pool, stop: asyncio.Event, metrics: WorkerMetrics | None = None) -> None:
    """Keep the next months' partitions of the partitioned tables created ahead of time."""
    while not stop.is_set():
        try:
            await ensure_partitions_ahead(pool)
            if metrics is not None:
                metrics.report("rr_partition_check_timestamp_seconds", time.time())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("partition check failed (%s)", type(exc).__name__)
        await sleep_unless_stopped(stop, PARTITION_CHECK_INTERVAL_S)


async def open_pool(settings: Settings, stop: asyncio.Event) -> asyncpg.Pool | None:
    """The worker's pool, waiting for PostgreSQL if it is down: a worker (re)started during an outage must
    be there to drain the billing streams when PostgreSQL is back, not exit. None: stopped meanwhile."""
    delay = 0.5
    while not stop.is_set():
        try:
            return await asyncpg.create_pool(settings.database_url, min_size=1, max_size=6, command_timeout=60)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("PostgreSQL unavailable at start-up (%s); retrying", type(exc).__name__)
            await sleep_unless_stopped(stop, delay)
            delay = min(delay * 2, 5.0)
    return None


async def wait_for_slot_map(redis: Redis, stop: asyncio.Event) -> bool:
    """Load a Redis Cluster client's slot map before the worker's tasks share the client, waiting for the
    cluster if it is not up yet (nothing to do for a single server). False: stopped meanwhile."""
    delay = 0.5
    while not stop.is_set():
        try:
            await load_slot_map(redis)
            return True
        except (RedisError, RedisClusterException, OSError) as exc:  # no node reached: not a RedisError
            log.warning("Redis Cluster unavailable at start-up (%s); retrying", type(exc).__name__)
            await sleep_unless_stopped(stop, delay)
            delay = min(delay * 2, 5.0)
    return False


async def run_workers(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = await open_pool(settings, stop)
    if pool is None:
        return
    redis = connect_redis(settings.redis_url, cluster=settings.redis_cluster)
    if not await wait_for_slot_map(redis, stop):
        await redis.aclose()
        await pool.close()
        return
    flusher = BillingFlusher(settings, pool, redis)
    metrics = WorkerMetrics(settings)
    metrics.total("rr_billing_events_flushed_total", flusher, "flushed")
    metrics.total("rr_billing_events_held_total", flusher, "held")
    recovery = UsageRecovery(settings, pool, redis)
    metrics.total("rr_usage_records_recovered_total", recovery, "recovered")
    tasks = [asyncio.create_task(flusher.run()), asyncio.create_task(manage_partitions(pool, stop, metrics)),
             asyncio.create_task(metrics.watch_backlog(redis, RedisKeys(settings.redis_prefix, settings.billing_shards),
                                                       stop)),
             asyncio.create_task(enforce_retention(pool, settings, stop)),
             asyncio.create_task(recovery.run(stop)),
             asyncio.create_task(process_payments(pool, redis, settings, stop))]
    if settings.probe_enabled:
        tasks.append(asyncio.create_task(ProbeRunner(settings, pool, redis).run(stop)))
    if settings.notify_enabled:
        tasks.append(asyncio.create_task(run_notify(pool, redis, settings, stop)))
    port = metrics.serve()
    if port is not None:
        log.info("worker metrics at http://%s:%d/metrics", settings.worker_metrics_host, port)
    log.info("worker started: billing flusher (%d shards), usage recovery, partition manager, payments, retention "
             "every %.0f s, probes %s, notifications %s", settings.billing_shards, settings.retention_interval_s,
             f"every {settings.probe_interval_s:.0f} s" if settings.probe_enabled else "off",
             "on" if settings.notify_enabled else "off")
    await stop.wait()
    flusher.stop()
    await asyncio.wait(tasks, timeout=15)
    metrics.close()
    await redis.aclose()
    await pool.close()
    log.info("worker stopped; %d events flushed", flusher.flushed)


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"rr-worker: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.log_format)
    try:
        import uvloop

        uvloop.run(run_workers(settings))
    except ImportError:
        asyncio.run(run_workers(settings))


if __name__ == "__main__":
    main()

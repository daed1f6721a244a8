"""The fault suite (`-m faults`): under steady load through the proxy, one fault at a time, each ending
with the ledger checked and the figures printed (`check_ledger`): no lost and no duplicated charge (ledger
sum == balance == live balance; usage records == billed answers, by request id), nothing billed that was
not served, nothing left reserved, and service back within a stated bound.

Bounds (asserted, printed with the measured figure):
- a proxy worker killed: the other worker keeps serving (first billed answer after the kill within
  `SERVICE_BOUND_S`); granian respawns the dead one;
- the billing flusher (rr-worker) killed: serving never stops; a restarted flusher writes the backlog;
- Redis killed and restarted from its append-only file: billed answers again within `SERVICE_BOUND_S`;
- Redis data lost (FLUSHALL): billed answers again within `SERVICE_BOUND_S` (live balances rebuilt from
  PostgreSQL), the charges of events that were lost with the stream recovered from the request log;
- PostgreSQL stopped (5 s here; 30 s in the `slow` variant): serving never stops; the backlog is written
  within `SERVICE_BOUND_S` of PostgreSQL's return;
- upstreams that hang, reset, answer garbage, a body that is not JSON, a body shorter than its
  content-length, or bytes nobody asked for: failover serves every request when a healthy route exists;
  without one the client gets an error and nothing is billed;
- the log folder's disk full: serving and billing go on; nothing crashes;
- the mail/webhook worker (rr-worker's notify loop) killed in the middle of a batch of webhook attempts held
  by a slow loopback receiver, with alert mail to a loopback mail catcher: every outbox event of the org (the
  load's `balance.low` crossing and bursts written straight into the outbox, some while the worker is down)
  reaches the receiver at least once (duplicates counted and printed) and has exactly one delivery record,
  succeeded, per endpoint; every alert mail record is sent once; nothing went anywhere but the receiver and
  the catcher; the ledger as above; delivery resumes within `SERVICE_BOUND_S` of the restart, and the
  attempts the dead worker had claimed are retried once their lease is over and the requeue finds them
  (lease + requeue grace + requeue interval, plus `SERVICE_BOUND_S`, from the kill).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import psutil
import pytest

from shared.crypto import box_from_settings, store_secret
from shared.notify.events import emit
from shared.notify.mail import save_smtp_config
from shared.notify.webhooks import new_signing_secret
from shared.workers.notify import REQUEUE_GRACE_S, REQUEUE_INTERVAL_S
from tests.faults.conftest import RESERVATION_TTL_S, FaultStack, check_ledger, recovery_time
from tests.faults.faulty_upstream import FaultyUpstream
from tests.faults.load import Outcome, SteadyLoad
from tests.notify_helpers import MailCatcher, Receiver

pytestmark = pytest.mark.faults

SERVICE_BOUND_S = 10.0  # a fault's end to the first billed answer of a request started after it


async def _tenant(stack: FaultStack, ffactory, *, latency_ms: int = 20, routes: list[tuple[str, int]] | None = None,
                  balance_micros: int = 1_000_000_000, **org_columns: object) -> tuple[int, str, str]:
    """An org, a key and a model; routes: (upstream base URL, priority) pairs, default the mock upstream."""
    org_id = await ffactory.org(balance_micros=balance_micros, **org_columns)
    _, api_key = await ffactory.key(org_id)
    routes = routes or [(stack.mock.url + "/v1", 0)]
    first = await ffactory.provider(routes[0][0], connect_timeout_ms=1000, read_timeout_ms=2000)
    model = await ffactory.model(first, priority=routes[0][1])
    for url, priority in routes[1:]:
        await ffactory.route(model, await ffactory.provider(url), model, priority=priority)
    async with httpx.AsyncClient() as http:
        await http.post(stack.mock.url + "/_mock/config", json={"models": {model: {"latency_ms": latency_ms}}})
    await ffactory.publish_config(stack.proxy, api_key, model)
    return org_id, api_key, model


async def _release_stale_reservations(stack: FaultStack, api_key: str, model: str) -> list[Outcome]:
    """Reservations of requests whose proxy worker died are released by the org's next reservation once
    they expire (shared/lua/reserve.lua): wait that long, then make one request."""
    await asyncio.sleep(RESERVATION_TTL_S + 0.5)
    load = SteadyLoad(stack.proxy.url, api_key, model, concurrency=1)
    load.start()
    await asyncio.sleep(0.5)
    return await load.stop()


async def test_proxy_worker_killed(fault_stack: FaultStack, ffactory, fdb, fredis) -> None:
    stack = fault_stack
    org_id, api_key, model = await _tenant(stack, ffactory, latency_ms=50)
    load = SteadyLoad(stack.proxy.url, api_key, model, concurrency=6)
    load.start()
    await asyncio.sleep(2.0)
    victim = stack.proxy_workers()[0]
    victim.kill()
    killed_at = time.monotonic()
    respawned = None
    while time.monotonic() - killed_at < 20:
        if len(stack.proxy_workers()) == 2 and victim.pid not in [p.pid for p in stack.proxy_workers()]:
            respawned = time.monotonic() - killed_at
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)
    outcomes = await load.stop()
    outcomes += await _release_stale_reservations(stack, api_key, model)
    back = recovery_time(outcomes, killed_at)
    assert back is not None and back < SERVICE_BOUND_S, f"no billed answer within {SERVICE_BOUND_S} s: {back}"
    assert respawned is not None, "granian did not respawn the killed worker"
    stack.print(f"[proxy worker kill -9] worker respawned after {respawned:.2f} s")
    await check_ledger(stack, fdb, fredis, org_id, outcomes, "proxy worker kill -9", recovery_s=back)


async def test_billing_flusher_killed(fault_stack: FaultStack, ffactory, fdb, fredis) -> None:
    stack = fault_stack
    org_id, api_key, model = await _tenant(stack, ffactory)
    load = SteadyLoad(stack.proxy.url, api_key, model)
    load.start()
    await asyncio.sleep(1.5)
    stack.worker.kill()
    stack.worker.wait()
    killed_at = time.monotonic()
    await asyncio.sleep(3.0)  # billed answers pile up in the stream, some of them read but not acknowledged
    served_while_down = sum(o.served for o in load.outcomes if o.started >= killed_at)
    stack.start_worker()
    restarted = time.monotonic()
    await asyncio.sleep(1.5)
    outcomes = await load.stop()
    assert served_while_down > 0, "the proxy stopped serving while the flusher was down"
    back = recovery_time(outcomes, killed_at)
    await check_ledger(stack, fdb, fredis, org_id, outcomes, "rr-worker (flusher) kill -9", recovery_s=back)
    stack.print(f"[rr-worker (flusher) kill -9] {served_while_down} answers served while it was down, backlog "
                f"written within {time.monotonic() - restarted:.2f} s of the restart (incl. checks)")


async def test_redis_killed_and_restarted_with_aof(fault_stack: FaultStack, ffactory, fdb, fredis) -> None:
    stack = fault_stack
    org_id, api_key, model = await _tenant(stack, ffactory, latency_ms=30)
    load = SteadyLoad(stack.proxy.url, api_key, model)
    load.start()
    await asyncio.sleep(1.5)
    stack.kill_redis()
    await asyncio.sleep(1.0)
    stack.start_redis()
    restarted = time.monotonic()
    await asyncio.sleep(3.0)
    outcomes = await load.stop()
    back = recovery_time(outcomes, restarted)
    assert back is not None and back < SERVICE_BOUND_S, f"no billed answer within {SERVICE_BOUND_S} s: {back}"
    await fredis.aclose()
    await check_ledger(stack, fdb, fredis, org_id, outcomes, "Redis kill -9 + restart (AOF)", recovery_s=back)


async def test_redis_data_lost(fault_stack: FaultStack, ffactory, fdb, fredis) -> None:
    stack = fault_stack
    org_id, api_key, model = await _tenant(stack, ffactory)
    load = SteadyLoad(stack.proxy.url, api_key, model)
    load.start()
    await asyncio.sleep(2.0)
    await fredis.flushall()
    lost_at = time.monotonic()
    await asyncio.sleep(3.0)
    outcomes = await load.stop()
    back = recovery_time(outcomes, lost_at)
    assert back is not None and back < SERVICE_BOUND_S, f"no billed answer within {SERVICE_BOUND_S} s: {back}"
    await check_ledger(stack, fdb, fredis, org_id, outcomes, "Redis FLUSHALL", recovery_s=back, timeout=40)
    recovered = await fdb.fetchval("select count(*) from usage_records where org_id = $1 and recovered", org_id)
    stack.print(f"[Redis FLUSHALL] {recovered} usage record(s) recovered from the request log (events lost "
                "with the stream)")


async def _postgres_down(stack: FaultStack, ffactory, fredis, down_s: float) -> None:
    org_id, api_key, model = await _tenant(stack, ffactory)
    load = SteadyLoad(stack.proxy.url, api_key, model)
    load.start()
    await asyncio.sleep(1.5)
    stack.stop_postgres()
    stopped = time.monotonic()
    await asyncio.sleep(down_s)
    served_while_down = sum(o.served for o in load.outcomes if o.started >= stopped)
    stack.start_postgres()
    restarted = time.monotonic()
    await asyncio.sleep(2.0)
    outcomes = await load.stop()
    assert served_while_down > 0, "the proxy stopped serving while PostgreSQL was down"
    back = recovery_time(outcomes, restarted)
    assert back is not None and back < SERVICE_BOUND_S, f"no billed answer within {SERVICE_BOUND_S} s: {back}"
    pool = await asyncpg.create_pool(stack.settings.database_url, min_size=1, max_size=4)
    try:
        name = f"PostgreSQL stopped {down_s:g} s"
        await check_ledger(stack, pool, fredis, org_id, outcomes, name, recovery_s=back, timeout=SERVICE_BOUND_S + 20)
        stack.print(f"[{name}] {served_while_down} answers served while it was down; backlog written "
                    f"{time.monotonic() - restarted:.2f} s after its return (incl. checks)")
    finally:
        await pool.close()


async def test_postgres_stopped(fault_stack: FaultStack, ffactory, fredis) -> None:
    await _postgres_down(fault_stack, ffactory, fredis, 5.0)


@pytest.mark.slow
async def test_postgres_stopped_30_s(fault_stack: FaultStack, ffactory, fredis) -> None:
    await _postgres_down(fault_stack, ffactory, fredis, 30.0)


@pytest.mark.parametrize("mode", ["hang", "reset", "garbage", "garbage_json", "short_body", "extra_bytes"])
async def test_upstream_misbehaves(fault_stack: FaultStack, ffactory, fdb, fredis, faulty: FaultyUpstream,
                                   mode: str) -> None:
    """A: the faulty upstream first, the mock behind it (failover serves all). B: the faulty one only."""
    stack = fault_stack
    org_a, key_a, model_a = await _tenant(stack, ffactory, routes=[(faulty.url, 10), (stack.mock.url + "/v1", 0)])
    org_b, key_b, model_b = await _tenant(stack, ffactory, routes=[(faulty.url, 0)])
    faulty.mode = mode
    with_fallback = SteadyLoad(stack.proxy.url, key_a, model_a, concurrency=2)
    alone = SteadyLoad(stack.proxy.url, key_b, model_b, concurrency=2)
    with_fallback.start()
    alone.start()
    await asyncio.sleep(4.0)
    faulty.mode = "ok"
    healed = time.monotonic()
    await asyncio.sleep(3.0)
    a, b = await with_fallback.stop(), await alone.stop()
    assert faulty.seen[mode] > 0, f"the faulty upstream never saw a request in mode {mode}"
    unserved_a = [o for o in a if not o.served and not o.partial]  # a stream cut after it began cannot fail over
    assert not unserved_a, (f"{mode}: with a healthy fallback route every request must be served: {unserved_a[:3]}"
                            f"\n{chr(10).join(stack.log_lines([o.request_id for o in unserved_a[:3]]))}")
    if mode != "extra_bytes":  # a correct answer with trailing bytes is served (the connection is dropped)
        assert any(not o.served and o.started < healed for o in b), f"{mode}: the faulty route's answers were served"
        assert all(o.status in (200, 502, 503, 504) for o in b if not o.served), [o for o in b if not o.served][:3]
        assert all(o.partial for o in b if o.status == 200 and not o.served), "a 200 neither served nor cut"
    back = recovery_time(b, healed)
    assert back is not None and back < SERVICE_BOUND_S, f"{mode}: route not back within {SERVICE_BOUND_S} s: {back}"
    await check_ledger(stack, fdb, fredis, org_a, a, f"upstream {mode}, with fallback")
    await check_ledger(stack, fdb, fredis, org_b, b, f"upstream {mode}, no fallback", recovery_s=back)


async def test_log_disk_full(fault_stack: FaultStack, ffactory, fdb, fredis, faulty: FaultyUpstream) -> None:
    """Every answer makes the proxy log a warning (usage beyond the reservation): each is a write to a disk
    with no space left."""
    stack = fault_stack
    org_id, api_key, model = await _tenant(stack, ffactory, routes=[(faulty.url, 0)])
    faulty.mode = "overuse"
    load = SteadyLoad(stack.proxy.url, api_key, model, stream_every=1_000_000)
    load.start()
    await asyncio.sleep(1.0)
    processes = [*stack.proxy_workers(), psutil.Process(stack.proxy.process.pid), psutil.Process(stack.worker.pid)]
    filler = stack.disk.fill(processes)
    full_at = time.monotonic()
    assert not stack.disk.tmpfs or not stack.disk.writable(), "the log disk is not full"
    await asyncio.sleep(3.0)
    full_for = time.monotonic() - full_at
    served_while_full = sum(o.served for o in load.outcomes if o.started >= full_at)
    stack.disk.free()
    freed = time.monotonic()
    await asyncio.sleep(1.0)
    outcomes = await load.stop()
    assert stack.proxy.process.poll() is None and stack.worker.poll() is None, "a process died of the full disk"
    assert served_while_full > 0, "the proxy stopped serving while the log disk was full"
    failed_while_full = [o for o in outcomes if full_at <= o.started < freed and not o.served]
    assert not failed_while_full, f"requests failed while the disk was full: {failed_while_full[:3]}"
    await check_ledger(stack, fdb, fredis, org_id, outcomes, "log disk full", recovery_s=recovery_time(outcomes, freed))
    stack.print(f"[log disk full] {stack.disk.method}, filler {filler} bytes, full for {full_for:.1f} s, "
                f"{served_while_full} answers served and billed meanwhile")


# The event types the mail/webhook test's endpoint is subscribed to (balance.* also go out by mail).
_HOOK_EVENTS = ["balance.low", "balance.depleted", "key.created", "key.revoked"]
_ALERTS_TO = "alerts@example.com"


async def _emit_burst(db: asyncpg.Pool, org_id: int, webhooks: int, mails: int) -> None:
    """Events straight into the outbox (as the control plane's key changes and the alerts write them)."""
    async with db.acquire() as conn, conn.transaction():
        for i in range(webhooks):
            await emit(conn, org_id, "key.created" if i % 2 else "key.revoked", {"key_id": i, "prefix": f"rr-{i}"})
        for i in range(mails):
            await emit(conn, org_id, "balance.low", {"balance_micros": i, "threshold_micros": 10**9, "crossing": i})


async def _notify_figures(db: asyncpg.Pool, org_id: int) -> tuple[list[int], dict[str, int], dict[str, int]]:
    """The org's subscribed event ids, its delivery rows by status and its mail rows by status."""
    events = [r["id"] for r in await db.fetch(
        "select id from event_outbox where org_id = $1 and event_type = any($2::text[]) order by id",
        org_id, _HOOK_EVENTS)]
    deliveries = dict(await db.fetch(
        "select status, count(*) from webhook_deliveries where org_id = $1 group by status", org_id))
    mails = dict(await db.fetch("select status, count(*) from mail_messages where org_id = $1 group by status", org_id))
    return events, deliveries, mails


async def test_mail_webhook_worker_killed(fault_stack: FaultStack, ffactory, fdb, fredis) -> None:
    stack = fault_stack
    # The alert threshold just below the opening balance: the load's first flushed batch crosses it.
    org_id, api_key, model = await _tenant(stack, ffactory, low_balance_threshold_micros=1_000_000_000 - 1,
                                           alert_emails=[_ALERTS_TO])
    box = box_from_settings(stack.settings.master_key_bytes, stack.settings.master_key_id)
    mail = MailCatcher().start()
    hooks = await Receiver(delay_s=0.5).start()  # slow: a batch of 50 concurrent attempts stays in flight
    try:
        async with fdb.acquire() as conn, conn.transaction():
            await save_smtp_config(conn, box, host="127.0.0.1", port=mail.port, tls_mode="none", username=None,
                                   from_address="relay@example.com")
            secret = await store_secret(conn, box, "webhook_signing_secret", new_signing_secret(), org_id=org_id)
            await conn.execute("insert into webhook_endpoints (org_id, url, event_types, secret_id) "
                               "values ($1, $2, $3, $4)", org_id, hooks.url, _HOOK_EVENTS, secret)
        load = SteadyLoad(stack.proxy.url, api_key, model)
        load.start()
        await asyncio.sleep(1.0)
        await _emit_burst(fdb, org_id, webhooks=200, mails=10)
        deadline = time.monotonic() + 30
        # Into the second batch of attempts, with some of them held by the receiver.
        while not (len(hooks.requests) > 60 and hooks.in_flight > 0):
            assert time.monotonic() < deadline, f"no delivery batch in flight: {len(hooks.requests)} requests"
            await asyncio.sleep(0.01)
        in_flight_at_kill, seen_at_kill = hooks.in_flight, len(hooks.requests)
        stack.worker.kill()
        stack.worker.wait()
        killed_at = time.monotonic()
        await _emit_burst(fdb, org_id, webhooks=20, mails=2)  # events written while nobody delivers
        await asyncio.sleep(1.0)
        seen_while_down = len(hooks.requests)
        restarting = time.monotonic()
        stack.start_worker()
        restarted = time.monotonic()
        while len(hooks.requests) == seen_while_down:
            assert time.monotonic() - restarted < SERVICE_BOUND_S, "no delivery after the restart"
            await asyncio.sleep(0.01)
        resumed = time.monotonic() - restarted
        await asyncio.sleep(1.0)
        outcomes = await load.stop()

        # What a dead worker had claimed is retried once its lease is over and the requeue finds it (the lease
        # as shared/workers/notify.py computes it).
        lease_s = max(stack.settings.webhook_timeout_s, stack.settings.smtp_timeout_s) * 2 + 30
        bound_s = lease_s + REQUEUE_GRACE_S + REQUEUE_INTERVAL_S + SERVICE_BOUND_S
        while True:
            events, deliveries, mails = await _notify_figures(fdb, org_id)
            if deliveries.get("pending", 0) == 0 and mails.get("pending", 0) == 0:
                break
            assert time.monotonic() - killed_at < bound_s, f"not delivered {bound_s:.0f} s after the kill: " \
                                                          f"{deliveries}, mails {mails}"
            await asyncio.sleep(0.5)
        all_done = time.monotonic() - killed_at

        # (a) every event delivered at least once, recorded as delivered exactly once.
        rows = await fdb.fetch(
            """select d.event_id, d.endpoint_id, count(*) as n, count(*) filter (where d.status = 'succeeded') as ok
               from webhook_deliveries d where d.org_id = $1 group by 1, 2""", org_id)
        assert len(events) >= 220 + 12 + 1, f"{len(events)} events: the load's balance.low missing?"
        assert {r["event_id"] for r in rows} == set(events), "an event without a delivery row"
        assert all(r["n"] == 1 and r["ok"] == 1 for r in rows), [dict(r) for r in rows if r["ok"] != 1][:5]
        received = [r.headers["webhook-id"] for r in hooks.requests]
        missing = {f"evt_{e}" for e in events} - set(received)
        assert not missing, f"{len(missing)} event(s) never reached the receiver: {sorted(missing)[:5]}"
        duplicates = len(received) - len(set(received))
        # Each attempt held by the receiver at the kill was never recorded, so it was made again.
        assert duplicates >= in_flight_at_kill, f"{in_flight_at_kill} in flight at the kill, {duplicates} duplicates"
        mail_events = await fdb.fetchval("select count(*) from event_outbox where org_id = $1 and event_type like "
                                         "'balance.%'", org_id)
        assert mails == {"sent": mail_events}, f"mail records {mails}, balance events {mail_events}"
        assert len(mail.mails) >= mail_events, f"{len(mail.mails)} mails caught of {mail_events} sent"

        # (b) nothing went anywhere but the loopback receiver and the mail catcher.
        foreign = await fdb.fetchval("""select count(*) from webhook_deliveries d
                                        join webhook_endpoints w on w.id = d.endpoint_id where w.url <> $1""",
                                     hooks.url)
        attempts = await fdb.fetchval("select coalesce(sum(attempts), 0) from webhook_deliveries")
        assert foreign == 0, f"{foreign} delivery record(s) to another endpoint"
        assert set(received) <= {f"evt_{e}" for e in events}, "the receiver got an event that is not the org's"
        assert attempts <= len(received), f"{attempts} recorded attempts, {len(received)} reached the receiver"
        assert all(m.recipients == [_ALERTS_TO] for m in mail.mails), [m.recipients for m in mail.mails][:5]
        assert await fdb.fetchval("select count(*) from mail_messages where recipients <> array[$1]", _ALERTS_TO) \
            == 0, "a mail record to another address"

        # (c) the ledger: the notifier never touches money.
        back = recovery_time(outcomes, killed_at)
        await check_ledger(stack, fdb, fredis, org_id, outcomes, "rr-worker (notify) kill -9", recovery_s=back)
        # (d) delivery resumed within the bound of the restart.
        assert resumed < SERVICE_BOUND_S
        stack.print(
            f"[rr-worker (notify) kill -9] {len(events)} events, killed with {in_flight_at_kill} attempts in flight "
            f"({seen_at_kill} requests received), restart took {restarted - restarting:.2f} s, first delivery "
            f"{resumed:.2f} s after it, all delivered {all_done:.1f} s after the kill (bound {bound_s:.0f} s: "
            f"lease {lease_s:.0f} s + requeue grace {REQUEUE_GRACE_S:.0f} s + interval); receiver got "
            f"{len(received)} requests, {duplicates} duplicate(s) (at-least-once); {len(mail.mails)} mails caught "
            f"for {mail_events} mail records (sent once each); {attempts} recorded attempts")
    finally:
        mail.stop()
        await hooks.stop()

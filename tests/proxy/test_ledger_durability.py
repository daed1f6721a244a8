"""The ledger survives crashes: a flusher killed mid-batch, PostgreSQL down under load, Redis losing its
data — and afterwards every billed request has exactly one usage record and one ledger effect, and every
org's balance equals the sum of its transactions. Each test runs its own proxy and workers under a private
Redis prefix (own billing streams), so nothing else flushes its events.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest

from shared.db.migrate import migrate
from shared.embedded import start_embedded_postgres
from shared.failpoints import FLUSHER_AFTER_COMMIT, FLUSHER_AFTER_COPY, FLUSHER_BEFORE_COPY
from shared.reconcile import reconcile
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from tests.conftest import ROOT, Factory, Server, settings_env, start_proxy, start_worker, stop_process
from tests.proxy.test_billing import PRICE, live, pg_money, wait_usage
from tests.proxy.test_endpoints import CHAT

_CHAT_LOGS_SQL = "select count(*) from request_logs where org_id = $1 and path = '/v1/chat/completions'"


def isolated(settings: Settings, **overrides: object) -> Settings:
    return msgspec.structs.replace(settings, redis_prefix=f"{settings.redis_prefix}iso{secrets.token_hex(3)}:",
                                   flusher_lease_ms=1000, flusher_block_ms=100, **overrides)


async def tenant_on(factory: Factory, proxy: Server, mock: Server, redis, iso: Settings) -> tuple[int, str, str]:
    """An org, key and priced model, visible to `proxy` (which listens on `iso`'s events channel)."""
    org_id = await factory.org(balance_micros=10_000_000)
    _, key = await factory.key(org_id)
    provider_id = await factory.provider(mock.url + "/v1")
    model = await factory.model(provider_id, price=PRICE)
    await redis.publish(RedisKeys(iso.redis_prefix).events_channel, "config")
    async with httpx.AsyncClient() as http:
        for _ in range(100):
            resp = await http.get(proxy.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
            if any(m["id"] == model for m in resp.json().get("data", [])):
                return org_id, key, model
            await asyncio.sleep(0.05)
    raise AssertionError("proxy never saw the model")


async def send(proxy: Server, key: str, model: str, n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=20) as http:
        responses = await asyncio.gather(*(
            http.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": model, **CHAT, "max_tokens": 6}) for _ in range(n)))
    return [r.status_code for r in responses]


async def assert_exact_ledger(db, redis, iso: Settings, org_id: int, served: int, start: int) -> None:
    """One usage record and one ledger effect per billed request; balances agree everywhere."""
    records = await wait_usage(db, org_id, served)
    assert len(records) == served == len({r["request_id"] for r in records})
    charged = sum(r["cost_micros"] for r in records)
    usage_txns = await db.fetch(
        "select id, amount_micros, request_count from balance_transactions where org_id = $1 and kind = 'usage'",
        org_id)
    by_txn: dict[int, list] = {}
    for r in records:
        by_txn.setdefault(r["transaction_id"], []).append(r)
    assert set(by_txn) == {t["id"] for t in usage_txns}, "a usage record without its ledger row, or vice versa"
    for t in usage_txns:
        assert -t["amount_micros"] == sum(r["cost_micros"] for r in by_txn[t["id"]])
        assert t["request_count"] == len(by_txn[t["id"]])
    assert await pg_money(db, org_id) == (start - charged, start - charged)
    keys = RedisKeys(iso.redis_prefix, iso.billing_shards)
    state = await live(redis, keys, org_id)
    assert (state["balance"], state["reserved"]) == (start - charged, 0)


def wait_exit(process: subprocess.Popen, timeout: float = 30) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the worker did not reach its failpoint") from None


@pytest.mark.parametrize("failpoint", [FLUSHER_BEFORE_COPY, FLUSHER_AFTER_COPY, FLUSHER_AFTER_COMMIT])
async def test_flusher_killed_mid_batch(failpoint: str, settings: Settings, mock_upstream: Server,
                                        factory: Factory, db, redis) -> None:
    iso = isolated(settings)
    proxy = start_proxy(iso)
    try:
        org_id, key, model = await tenant_on(factory, proxy, mock_upstream, redis, iso)
        assert await send(proxy, key, model, 20) == [200] * 20
        crashing = start_worker(iso, failpoint=failpoint)
        assert await asyncio.to_thread(wait_exit, crashing) == 77
        if failpoint == FLUSHER_AFTER_COMMIT:  # the batch is in PostgreSQL, but was never acknowledged
            assert await db.fetchval("select count(*) from usage_records where org_id = $1", org_id) == 20
        else:
            assert await db.fetchval("select count(*) from usage_records where org_id = $1", org_id) == 0
        recovering = start_worker(iso)
        try:
            await assert_exact_ledger(db, redis, iso, org_id, 20, 10_000_000)
            keys = RedisKeys(iso.redis_prefix, iso.billing_shards)
            stream = keys.org(org_id).stream
            for _ in range(300):  # the adopted entries are acknowledged once written (a slow start-up included)
                if (await redis.xpending(stream, RedisKeys.BILLING_GROUP))["pending"] == 0:
                    break
                await asyncio.sleep(0.1)
            assert (await redis.xpending(stream, RedisKeys.BILLING_GROUP))["pending"] == 0
        finally:
            stop_process(recovering)
    finally:
        proxy.stop()


async def test_postgres_down_under_load(settings: Settings, mock_upstream: Server, redis) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="rr-pgdown-"))
    pg = start_embedded_postgres(data_dir / "pg")
    await migrate(pg.url)
    iso = isolated(settings, database_url=pg.url, key_cache_ttl_s=1.0, config_refresh_interval_s=1.0)
    pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=2)
    factory = Factory(pool, redis, RedisKeys(iso.redis_prefix), iso)
    proxy = start_proxy(iso)
    worker = start_worker(iso)
    try:
        org_id, key, model = await tenant_on(factory, proxy, mock_upstream, redis, iso)
        assert await send(proxy, key, model, 5) == [200] * 5
        await wait_usage(pool, org_id, 5)
        await pool.close()
        pg.stop()

        outage_started = time.monotonic()
        served = 5
        while time.monotonic() - outage_started < 4:  # longer than every cache TTL and refresh interval
            assert await send(proxy, key, model, 10) == [200] * 10, "requests failed while PostgreSQL was down"
            served += 10
            await asyncio.sleep(0.3)
        keys = RedisKeys(iso.redis_prefix, iso.billing_shards)
        assert (await live(redis, keys, org_id))["balance"] < 10_000_000  # charged live during the outage

        pg = start_embedded_postgres(data_dir / "pg")
        assert pg.url == iso.database_url
        pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=2)
        await assert_exact_ledger(pool, redis, iso, org_id, served, 10_000_000)
        logs = await pool.fetchval(_CHAT_LOGS_SQL, org_id)
        for _ in range(100):
            if logs >= served:
                break
            await asyncio.sleep(0.1)
            logs = await pool.fetchval(_CHAT_LOGS_SQL, org_id)
        assert logs == served, "request metadata buffered during the outage was lost"
        await pool.close()
    finally:
        stop_process(worker)
        proxy.stop()
        pg.stop()


async def test_redis_flushed_balances_rebuilt_and_nothing_unbilled(
    settings: Settings, mock_upstream: Server, factory: Factory, db, redis,
) -> None:
    iso = isolated(settings)
    proxy = start_proxy(iso)
    worker = start_worker(iso)
    try:
        org_id, key, model = await tenant_on(factory, proxy, mock_upstream, redis, iso)
        assert await send(proxy, key, model, 10) == [200] * 10
        await wait_usage(db, org_id, 10)
        await asyncio.sleep(0.3)  # let the flusher acknowledge
        # Redis loses everything of this deployment (as after a restart without persistence).
        async for k in redis.scan_iter(match=iso.redis_prefix + "*", count=1000):
            await redis.delete(k)
        assert await send(proxy, key, model, 10) == [200] * 10
        await assert_exact_ledger(db, redis, iso, org_id, 20, 10_000_000)
    finally:
        stop_process(worker)
        proxy.stop()


async def test_reconcile_finds_and_repairs_drift(settings: Settings, mock_upstream: Server, factory: Factory,
                                                 db, redis) -> None:
    iso = isolated(settings)
    proxy = start_proxy(iso)
    worker = start_worker(iso)
    try:
        org_id, key, model = await tenant_on(factory, proxy, mock_upstream, redis, iso)
        assert await send(proxy, key, model, 5) == [200] * 5
        await assert_exact_ledger(db, redis, iso, org_id, 5, 10_000_000)
        assert [d for d in await reconcile(iso) if d.org_id == org_id] == []

        keys = RedisKeys(iso.redis_prefix, iso.billing_shards)
        await redis.hincrby(keys.org(org_id).balance, "balance", 123)  # live balance drifts by 123 µ$
        cli = [sys.executable, "-c", "from shared.reconcile import main; main()"]
        result = await asyncio.to_thread(subprocess.run, cli, env=settings_env(iso), cwd=ROOT, capture_output=True,
                                         text=True, timeout=60)
        assert result.returncode == 1
        assert f"org {org_id}: live drift" in result.stdout and "off by 0.000123" in result.stdout
        repaired = await asyncio.to_thread(subprocess.run, [*cli, "--repair"], env=settings_env(iso), cwd=ROOT,
                                           capture_output=True, text=True, timeout=60)
        assert f"org {org_id}: live drift" in repaired.stdout
        assert [d for d in await reconcile(iso) if d.org_id == org_id] == []
        await assert_exact_ledger(db, redis, iso, org_id, 5, 10_000_000)

        await db.execute("update org_balances set balance_micros = balance_micros + 7 where org_id = $1", org_id)
        ledger = [d for d in await reconcile(iso) if d.org_id == org_id]
        assert [(d.kind, d.actual_micros - d.expected_micros) for d in ledger if d.kind == "ledger"] == [("ledger", 7)]
        await db.execute("update org_balances set balance_micros = balance_micros - 7 where org_id = $1", org_id)
    finally:
        stop_process(worker)
        proxy.stop()

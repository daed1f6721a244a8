"""Key authentication: caches, revocation and expiry reach every proxy process within seconds."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import pytest

from shared.apikeys import KeyRecord, revoke_api_key
from tests.conftest import Factory, Server, Tenant, start_proxy
from tests.proxy.test_endpoints import CHAT


@pytest.fixture(scope="module")
def two_worker_proxy(settings) -> Server:
    server = start_proxy(settings, proxy_workers=2)
    yield server
    server.stop()


async def _statuses(url: str, key: str, model: str, n: int) -> list[int]:
    async with httpx.AsyncClient(timeout=10) as http:
        # New connections each time, so both workers of the server get requests.
        return [
            (await http.post(url + "/v1/chat/completions", json={"model": model, **CHAT},
                             headers={"authorization": f"Bearer {key}", "connection": "close"})).status_code
            for _ in range(n)
        ]


async def test_revocation_reaches_every_worker_within_seconds(
    two_worker_proxy: Server, proxy: Server, tenant: Tenant, factory: Factory, db, redis, redis_keys, settings
) -> None:
    await factory.publish_config(two_worker_proxy, tenant.api_key, tenant.model)
    # Warm every cache level (both workers, both proxies, Redis).
    assert set(await _statuses(two_worker_proxy.url, tenant.api_key, tenant.model, 10)) == {200}
    assert set(await _statuses(proxy.url, tenant.api_key, tenant.model, 2)) == {200}
    assert await redis.get(redis_keys.api_key(tenant.api_key[3:11])) is not None

    assert await revoke_api_key(db, redis, redis_keys, tenant.key_id, settings.redis_key_cache_ttl_s)
    revoked_at = time.monotonic()
    for server in (two_worker_proxy, proxy):
        while True:
            statuses = await _statuses(server.url, tenant.api_key, tenant.model, 10)
            if set(statuses) == {401}:
                break
            assert time.monotonic() - revoked_at < 5, f"still accepted after 5 s: {statuses}"
            await asyncio.sleep(0.2)
    # The Redis cache holds the revoked state (overwritten, not deleted).
    cached = msgspec.msgpack.decode(await redis.get(redis_keys.api_key(tenant.api_key[3:11])), type=KeyRecord)
    assert cached.active is False
    async with httpx.AsyncClient() as http:
        resp = await http.post(proxy.url + "/v1/chat/completions", headers=tenant.auth,
                               json={"model": tenant.model, **CHAT})
    assert resp.json()["error"]["code"] == "api_key_revoked"


async def test_revoking_twice_is_refused(tenant: Tenant, db, redis, redis_keys, settings) -> None:
    assert await revoke_api_key(db, redis, redis_keys, tenant.key_id, 60)
    assert not await revoke_api_key(db, redis, redis_keys, tenant.key_id, 60)


async def test_expired_key_is_refused(client: httpx.AsyncClient, proxy: Server, tenant: Tenant,
                                      factory: Factory) -> None:
    _, expired = await factory.key(tenant.org_id, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    resp = await client.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {expired}"},
                             json={"model": tenant.model, **CHAT})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "api_key_expired"


async def test_key_expiring_while_cached_is_refused(client: httpx.AsyncClient, proxy: Server, tenant: Tenant,
                                                    factory: Factory) -> None:
    _, key = await factory.key(tenant.org_id, expires_at=datetime.now(UTC) + timedelta(seconds=1.5))
    auth = {"authorization": f"Bearer {key}"}
    url = proxy.url + "/v1/chat/completions"
    assert (await client.post(url, headers=auth, json={"model": tenant.model, **CHAT})).status_code == 200
    await asyncio.sleep(1.6)
    assert (await client.post(url, headers=auth, json={"model": tenant.model, **CHAT})).status_code == 401


async def test_suspended_org_keys_are_refused(client: httpx.AsyncClient, proxy: Server, tenant: Tenant,
                                              db, redis, redis_keys, settings) -> None:
    from shared.apikeys import publish_key_change

    await db.execute("update orgs set status = 'suspended' where id = $1", tenant.org_id)
    await publish_key_change(redis, redis_keys, db, tenant.api_key[3:11], settings.redis_key_cache_ttl_s)
    for _ in range(50):
        resp = await client.post(proxy.url + "/v1/chat/completions", headers=tenant.auth,
                                 json={"model": tenant.model, **CHAT})
        if resp.status_code == 401:
            break
        await asyncio.sleep(0.1)
    assert resp.status_code == 401

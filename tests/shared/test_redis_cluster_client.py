"""The Redis Cluster client under concurrency, on a 3-master cluster of this module's own
(tests/redis_cluster.py): many tasks sharing one fresh client, and a flusher whose client closes its
connections under it, as redis-py does itself on CLUSTERDOWN or a lost slot.

Before shared/redis_client.py loaded the slot map first and kept MOVED from closing the client, 16 shard
loops starting together on a fresh client got MOVED replies, redis-py closed every connection under them,
and some of the loops died of a RuntimeError or AttributeError: their streams were never flushed again
(the cluster run of the money tests saw 0 usage records for 89 answers).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.embedded import free_port
from shared.redis_client import connect_redis, open_redis
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from shared.workers.flusher import BillingFlusher
from shared.workers.main import wait_for_slot_map
from tests.conftest import Factory
from tests.redis_cluster import RedisClusterServers
from tests.shared.test_flusher import _encode, _event


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers()
    yield servers
    servers.stop()


async def _shard_round(redis: Redis, prefix: str, shard: int) -> None:
    """What a flusher's shard loop does first: the lease, the group, a blocking read."""
    tag = f"{prefix}{{s:{shard}}}"
    assert await redis.set(f"{tag}:lease", "t", nx=True, px=5000)
    try:
        await redis.xgroup_create(f"{tag}:billing", "g", id="0", mkstream=True)
    except ResponseError as exc:
        assert "BUSYGROUP" in str(exc)
    await redis.xreadgroup("g", "c", {f"{tag}:billing": ">"}, count=10, block=20)
    await redis.delete(f"{tag}:lease")


@pytest.mark.parametrize("opened", ["open_redis", "connect_redis"])
async def test_many_tasks_on_a_fresh_cluster_client_all_succeed(cluster: RedisClusterServers, opened: str) -> None:
    """32 shard-like tasks sharing a fresh client, three times: not one command fails (with redis-py's
    defaults, three runs out of three lost several tasks to errors from closed connections)."""
    for _ in range(3):
        prefix = f"rrtest:cc{secrets.token_hex(3)}:"
        if opened == "open_redis":
            redis = await open_redis(cluster.url, cluster=True)
        else:  # loaded lazily by the first commands: MOVED replies must still close nothing under the others
            redis = connect_redis(cluster.url, cluster=True)
        try:
            results = await asyncio.gather(*(_shard_round(redis, prefix, s) for s in range(32)),
                                           return_exceptions=True)
            assert [r for r in results if r is not None] == []
        finally:
            await redis.aclose()


async def test_a_flusher_outlives_its_cluster_client_closing_under_it(
    cluster: RedisClusterServers, settings: Settings, factory: Factory, db,
) -> None:
    """The client's connections are closed 500 times under the flusher's in-flight commands (some of them
    while its loops reconnect: those fail with RuntimeError or AttributeError, not a Redis error); every shard
    still writes the events that arrive afterwards (a shard loop that died would leave its stream alone)."""
    shards = 4
    own = msgspec.structs.replace(settings, redis_prefix=f"rrtest:fc{secrets.token_hex(3)}:", billing_shards=shards,
                                  flusher_interval_ms=20, flusher_block_ms=50, redis_url=cluster.url,
                                  flusher_lease_ms=2000, redis_cluster=True)
    keys = RedisKeys(own.redis_prefix, shards)
    redis = await open_redis(cluster.url, cluster=True)
    flusher = BillingFlusher(own, db, redis)
    task = asyncio.create_task(flusher.run())
    try:
        for i in range(500):
            await asyncio.sleep(0.002 * (i % 5))
            await redis.aclose()  # what redis-py does itself on CLUSTERDOWN: every connection, in use or not
        orgs = [await factory.org(balance_micros=1_000_000) for _ in range(shards * 2)]
        for org_id in orgs:
            e = _event(org_id, 7)
            await redis.xadd(keys.org(org_id).stream, {"o": e.org_id, "c": e.cost_micros, "d": _encode(e)})
        assert {org_id % shards for org_id in orgs} == set(range(shards))
        for _ in range(600):  # a loop that hit an error retries after a second, its lease after 2 s
            if flusher.flushed >= len(orgs) or task.done():
                break
            await asyncio.sleep(0.05)
        assert not task.done(), task.exception()
        assert flusher.flushed == len(orgs)
    finally:
        flusher.stop()
        await asyncio.wait_for(task, 15)
        await redis.aclose()
    rows = await db.fetch("select org_id from usage_records where org_id = any($1::bigint[])", orgs)
    assert sorted(r["org_id"] for r in rows) == sorted(orgs)


async def test_the_worker_waits_for_the_cluster_and_then_loads_its_map(cluster: RedisClusterServers) -> None:
    """Unreachable, the cluster is waited for (redis-py raises RedisClusterException, not a RedisError) until
    the worker is stopped; reachable, its slot map is loaded."""
    stop = asyncio.Event()
    down = connect_redis(f"redis://127.0.0.1:{free_port()}/0", cluster=True)
    asyncio.get_running_loop().call_later(0.3, stop.set)
    try:
        assert await wait_for_slot_map(down, stop) is False
    finally:
        await down.aclose()
    up = connect_redis(cluster.url, cluster=True)
    try:
        assert await wait_for_slot_map(up, asyncio.Event()) is True
        assert up.get_default_node() is not None
    finally:
        await up.aclose()

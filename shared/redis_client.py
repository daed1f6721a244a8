"""The one way processes open Redis: a blocking pool, so a burst waits for a connection instead of failing;
or a Redis Cluster client.

A cluster client must have its slot map loaded (`load_slot_map`, or `open_redis`) before tasks share it.
redis-py's async RedisCluster sends a command issued while it has no default node (before its first
CLUSTER SLOTS, and after it closed itself) to an arbitrary master instead of its key's master, which
answers MOVED. By default it answers every fifth MOVED by closing *every* connection of the client,
including the ones other tasks are reading from, which then fail with errors that are not Redis errors
(RuntimeError or AttributeError from a closed transport), and it forgets the default node again. When 16
flusher shard loops started together on a fresh client, that closing repeated and killed some of the loops
(their streams were never flushed again)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

__all__ = ["connect_redis", "load_slot_map", "open_redis"]


def connect_redis(url: str, *, cluster: bool = False, max_connections: int = 256, timeout_s: float = 5.0) -> Redis:
    """A client for the server at `url`, or (`cluster`, RR_REDIS_CLUSTER) for the Redis Cluster it belongs
    to: redis-py's RedisCluster routes each command by its key's slot (our keys share hash tags where a
    script or a pipeline uses several, see shared/redis_keys.py). Load a cluster client's slot map before
    concurrent use (`load_slot_map`)."""
    if cluster:
        # reinitialize_steps=0: a MOVED reply updates that slot's owner and retries there, never closing the
        # whole client under the other tasks' in-flight commands (see the module docstring).
        return RedisCluster.from_url(url, max_connections=max_connections, socket_timeout=timeout_s,
                                     socket_connect_timeout=timeout_s,
                                     reinitialize_steps=0)  # type: ignore[return-value]
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                           socket_connect_timeout=timeout_s, health_check_interval=30)
    return Redis(connection_pool=pool)


async def load_slot_map(redis: Redis) -> None:
    """Read a cluster client's slot map now, so that concurrent first commands are routed by their keys'
    slots (nothing to do for a single server). Raises RedisError or OSError when the cluster is unreachable."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()


async def open_redis(url: str, *, cluster: bool = False, max_connections: int = 256,
                     timeout_s: float = 5.0) -> Redis:
    """`connect_redis` with a cluster's slot map already loaded: what a process opens on start-up."""
    redis = connect_redis(url, cluster=cluster, max_connections=max_connections, timeout_s=timeout_s)
    try:
        await load_slot_map(redis)
    except BaseException:
        await redis.aclose()
        raise
    return redis

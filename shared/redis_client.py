"""The one way processes open Redis: a blocking pool, so a burst waits for a connection instead of failing;
or a Redis Cluster client."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

__all__ = ["connect_redis"]


def connect_redis(url: str, *, cluster: bool = False, max_connections: int = 256, timeout_s: float = 5.0) -> Redis:
    """A client for the server at `url`, or (`cluster`, RR_REDIS_CLUSTER) for the Redis Cluster it belongs
    to: redis-py's RedisCluster routes each command by its key's slot (our keys share hash tags where a
    script or a pipeline uses several, see shared/redis_keys.py)."""
    if cluster:
        return RedisCluster.from_url(url, max_connections=max_connections, socket_timeout=timeout_s,
                                     socket_connect_timeout=timeout_s)  # type: ignore[return-value]
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                           socket_connect_timeout=timeout_s, health_check_interval=30)
    return Redis(connection_pool=pool)

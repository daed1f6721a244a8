"""The one way processes open Redis: a blocking pool, so a burst waits for a connection instead of failing."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

__all__ = ["connect_redis"]


def connect_redis(url: str, *, max_connections: int = 256, timeout_s: float = 5.0) -> Redis:
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                           socket_connect_timeout=timeout_s, health_check_interval=30)
    return Redis(connection_pool=pool)

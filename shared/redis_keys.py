"""Every Redis key and channel name, in one place.

All names start with the configured prefix (`RR_REDIS_PREFIX`), so several deployments or test runs share
one Redis without colliding. Keys that one Lua script touches together carry the same hash tag (`{org:ID}`),
so the scripts run unchanged on Redis Cluster.
"""

from __future__ import annotations

__all__ = ["RedisKeys"]


class RedisKeys:
    """Key builders bound to one prefix; built once per process."""

    __slots__ = ("events_channel", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        # Proxies subscribe here: `key:<key prefix>` (a key changed), `config` (models, prices, routes).
        self.events_channel = f"{prefix}events"

    def api_key(self, key_prefix: str) -> str:
        """Cached `KeyRecord` of one API key, by its public prefix."""
        return f"{self.prefix}apikey:{key_prefix}"

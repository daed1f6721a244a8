"""The notification queues in Redis: a sorted set of record ids (webhook deliveries, mails) by due time.

PostgreSQL holds each record and its `next_attempt_at`; the sorted set says when to look at it. Popping is
one script, so two workers never take the same id; an id lost to a crash between pop and attempt is put
back by `requeue` from PostgreSQL (ZADD, so an id already queued is not doubled), and the attempt itself is
claimed in PostgreSQL (see shared/workers/notify.py), so an id that is popped twice is still sent once.
"""

from __future__ import annotations

from redis.asyncio import Redis

__all__ = ["DueQueue"]

# Take up to `limit` ids due by `now` and remove them in the same step: the race it prevents is two workers
# reading the same due ids and both attempting them.
_POP_DUE = """
local queue = KEYS[1]
local now_ms = ARGV[1]
local limit = tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', queue, '-inf', now_ms, 'LIMIT', 0, limit)
if #ids > 0 then redis.call('ZREM', queue, unpack(ids)) end
return ids
"""


class DueQueue:
    """One sorted set of ids by due time (unix ms)."""

    __slots__ = ("_pop", "key", "redis")

    def __init__(self, redis: Redis, key: str) -> None:
        self.redis = redis
        self.key = key
        self._pop = redis.register_script(_POP_DUE)

    async def push(self, items: dict[int, float]) -> None:
        """Queue ids at their due times (unix seconds); an id already queued gets the new time."""
        if items:
            await self.redis.zadd(self.key, {str(i): int(t * 1000) for i, t in items.items()})

    async def requeue(self, items: dict[int, float]) -> None:
        """Queue ids that may have been lost, leaving those already queued as they are."""
        if items:
            await self.redis.zadd(self.key, {str(i): int(t * 1000) for i, t in items.items()}, nx=True)

    async def pop_due(self, now: float, limit: int) -> list[int]:
        return [int(i) for i in await self._pop(keys=[self.key], args=[int(now * 1000), limit])]

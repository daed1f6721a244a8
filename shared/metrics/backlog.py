"""How far the billing flusher is behind: per billing stream, the usage events not yet in the PostgreSQL
ledger and the age of the oldest of them. Read at scrape time (proxy) or every few seconds (rr-worker),
never per request: a handful of pipelined XINFO/XPENDING/XRANGE calls for all shards."""

from __future__ import annotations

import time
from typing import NamedTuple

from redis.asyncio import Redis

from shared.redis_keys import RedisKeys

__all__ = ["ShardBacklog", "read_billing_backlog"]


class ShardBacklog(NamedTuple):
    shard: int
    events: int  # usage events waiting
    oldest_age_s: float  # how long the oldest of them has waited (0 when none waits)


def _field(info: dict, name: str):
    value = info.get(name, info.get(name.encode()))
    return value.decode() if isinstance(value, bytes) else value


def _ms(entry_id: str | bytes) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


async def read_billing_backlog(redis: Redis, keys: RedisKeys, now: float | None = None) -> list[ShardBacklog]:
    """One entry per shard. Waiting = delivered but unacknowledged (a batch in hand, or a dead flusher's) plus
    never delivered (the group's `lag`); with no consumer group yet (no flusher ever ran), every entry waits."""
    now = time.time() if now is None else now
    streams = [keys.stream(s) for s in range(keys.shards)]
    pipe = redis.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
        pipe.xlen(stream)
    replies = await pipe.execute(raise_on_error=False)
    plans = []  # per shard: (pending, undelivered, how to find the oldest)
    follow = redis.pipeline(transaction=False)
    for shard, stream in enumerate(streams):
        groups, length = replies[2 * shard], replies[2 * shard + 1]
        if isinstance(groups, Exception) or isinstance(length, Exception):
            plans.append((0, 0, None))  # no stream yet: nothing was ever billed on this shard
            continue
        group = next((g for g in groups if _field(g, "name") == RedisKeys.BILLING_GROUP), None)
        if group is None:
            plans.append((0, int(length), "first" if length else None))
            if length:
                follow.xrange(stream, count=1)
            continue
        pending = int(_field(group, "pending") or 0)
        lag = _field(group, "lag")
        undelivered = int(length) if lag is None else int(lag)  # None: Redis cannot tell; XLEN bounds it
        if pending:
            plans.append((pending, undelivered, "pending"))
            follow.xpending(stream, RedisKeys.BILLING_GROUP)
        elif undelivered:
            plans.append((0, undelivered, "first"))
            follow.xrange(stream, min=f"({_field(group, 'last-delivered-id')}", count=1)
        else:
            plans.append((0, 0, None))
    found = await follow.execute(raise_on_error=False) if len(follow) else []
    out, i = [], 0
    for shard, (pending, undelivered, how) in enumerate(plans):
        age = 0.0
        if how is not None:
            reply = found[i]
            i += 1
            oldest = None
            if how == "pending" and isinstance(reply, dict):
                oldest = reply.get("min")
            elif how == "first" and isinstance(reply, list) and reply:
                oldest = reply[0][0]
            if oldest:
                age = max(0.0, now - _ms(oldest) / 1000)
        out.append(ShardBacklog(shard, pending + undelivered, age))
    return out

"""Keeps this process's caches current: listens on the Redis events channel and refreshes periodically.

Messages: `key:<prefix>` evicts one cached API key; `byok:<org id>` evicts an org's BYOK credentials;
`config` reloads the catalogue (models, prices, routes, providers) and drops cached BYOK credentials.
After a (re)connection everything is reloaded, since messages sent while we were away are lost; the periodic
refresh bounds staleness even if the channel silently stalls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.auth import Authenticator
from proxy.byok import ByokCredentials
from shared.redis_keys import RedisKeys

__all__ = ["EventListener"]

log = logging.getLogger("rocket_relay.events")


class EventListener:
    def __init__(self, redis: Redis, keys: RedisKeys, auth: Authenticator, byok: ByokCredentials,
                 reload_catalogue: Callable[[], Awaitable[None]], *, refresh_interval_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._auth = auth
        self._byok = byok
        self._reload = reload_catalogue
        self._interval = refresh_interval_s
        self._tasks: list[asyncio.Task] = []
        self.subscribed = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen(), name="events-listen"),
                       asyncio.create_task(self._refresh(), name="events-refresh")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _listen(self) -> None:
        first = True
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.events_channel)
                if not first:
                    self._auth.clear()
                    self._byok.clear()
                    await self._reload()
                first = False
                self.subscribed.set()
                async for message in pubsub.listen():
                    await self._handle(message["data"])
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("events channel lost (%s); reconnecting", type(exc).__name__)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("events listener failed; restarting")
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()

    async def _handle(self, data: bytes) -> None:
        if data.startswith(b"key:"):
            self._auth.evict(data[4:].decode())
        elif data.startswith(b"byok:"):
            self._byok.evict(int(data[5:]))
        elif data == b"config":
            self._byok.clear()
            await self._reload()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._reload()
            except Exception as exc:
                log.warning("periodic catalogue refresh failed (%s)", type(exc).__name__)

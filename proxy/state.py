"""Everything a request needs, built once per worker process on ASGI lifespan start-up and closed on
shutdown: pools, clients, caches and background tasks. Nothing is done at import time."""

from __future__ import annotations

import logging
import time

import asyncpg
from redis.asyncio import Redis

from proxy.auth import Authenticator
from proxy.billing import Biller
from proxy.byok import ByokCredentials
from proxy.events import EventListener
from proxy.health import CircuitBreakers, RouteStats
from proxy.http import BodyReader, ClientAddress
from proxy.metrics import ProxyMetrics, proxy_metrics_dir
from proxy.records import RequestLogWriter
from proxy.routing import Catalogue, load_catalogue
from proxy.upstream import UpstreamClient
from shared.crypto import box_from_settings
from shared.metrics.recorder import Recorder
from shared.metrics.snapshots import SnapshotWriter
from shared.redis_client import open_redis
from shared.redis_keys import RedisKeys
from shared.redis_pipeline import pipelined_redis
from shared.settings import Settings

__all__ = ["ProxyState", "start_state"]

log = logging.getLogger("rocket_relay.proxy")


class ProxyState:
    """Everything a request needs, built once per worker process on start-up."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: Redis) -> None:
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
        self.box = box_from_settings(settings.master_key_bytes, settings.master_key_id, settings.old_master_keys_map)
        self.fast_redis = pipelined_redis(settings.redis_url, cluster=settings.redis_cluster,
                                          connections=settings.redis_pipeline_connections,
                                          timeout_s=settings.redis_timeout_s)
        self.auth = Authenticator(
            pool, self.fast_redis, self.keys, settings.key_pepper.encode(), ttl_s=settings.key_cache_ttl_s,
            negative_ttl_s=settings.key_negative_cache_ttl_s, redis_ttl_s=settings.redis_key_cache_ttl_s,
        )
        self.catalogue = Catalogue({})
        self.biller = Biller(settings, pool, redis, self.fast_redis, self.keys)
        self.breakers = CircuitBreakers(threshold=settings.breaker_threshold, cooldown_s=settings.breaker_cooldown_s)
        self.route_stats = RouteStats()  # recent latency and throughput per route (provider sort)
        self.byok = ByokCredentials(pool, self.box, ttl_s=60.0)
        self.upstream = UpstreamClient(pool_size=settings.upstream_pool_size,
                                       max_connect_timeout_s=settings.upstream_connect_timeout_s,
                                       max_read_timeout_s=settings.upstream_read_timeout_s)
        self.log_writer = RequestLogWriter(pool, batch_size=settings.log_batch_size,
                                           interval_s=settings.log_flush_interval_ms / 1000,
                                           buffer_max=settings.log_buffer_max)
        self.client_address = ClientAddress(settings.trusted_proxy_header, settings.trusted_proxies)
        self.bodies = BodyReader(settings.max_body_bytes, settings.body_read_timeout_s,
                                 settings.max_unfinished_requests_per_client)
        self.metrics = ProxyMetrics(Recorder())
        self.metrics.watch(self)
        if settings.metrics_token and settings.metrics_dir:  # served for all workers by whichever is scraped
            self.metrics.writer = SnapshotWriter(self.metrics.recorder, proxy_metrics_dir(settings.metrics_dir),
                                                 settings.metrics_interval_s)
        self.events = EventListener(redis, self.keys, self.auth, self.byok, self.reload_catalogue,
                                    refresh_interval_s=settings.config_refresh_interval_s)

    async def reload_catalogue(self) -> None:
        # The periodic refresh and an events-channel reload can overlap: the older snapshot must not win.
        fresh = await load_catalogue(self.pool, self.box)
        if fresh.loaded_at >= self.catalogue.loaded_at:
            self.catalogue = fresh

    async def start(self) -> None:
        await self.reload_catalogue()
        await self.upstream.start()
        self.bodies.start()
        self.log_writer.start()
        self.events.start()
        if self.metrics.writer is not None:
            self.metrics.writer.start()

    async def close(self) -> None:
        await self.events.close()
        await self.bodies.close()
        await self.biller.close()
        await self.log_writer.close()
        if self.metrics.writer is not None:
            await self.metrics.writer.close()
        await self.upstream.close()
        await self.fast_redis.aclose()
        await self.redis.aclose()
        await self.pool.close()



async def start_state(settings: Settings) -> ProxyState:
    started = time.perf_counter()
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4, command_timeout=30)
    # A cluster's slot map is loaded before anything shares the client (shared/redis_client.py); redis-py's
    # cluster pub/sub also reads it without loading it first.
    redis = await open_redis(settings.redis_url, cluster=settings.redis_cluster)
    state = ProxyState(settings, pool, redis)
    await state.start()
    log.info("proxy worker ready in %.0f ms", (time.perf_counter() - started) * 1000)
    return state

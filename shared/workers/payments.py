"""rr-worker's payments loop: Stripe events left behind by a webhook request (the control plane died after
storing one, or processing failed), waiting events whose back-off is over, and ledger credits whose live
balance update a dead process never made (the `pending_live_credits` outbox)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import redis.exceptions
from redis.asyncio import Redis

from shared.billing import BillingScripts
from shared.payments.ledger import retry_live_credits
from shared.payments.stripe_events import EventProcessor
from shared.redis_keys import RedisKeys
from shared.settings import Settings
from shared.workers import sleep_unless_stopped

__all__ = ["PAYMENTS_INTERVAL_S", "process_payments"]

log = logging.getLogger("rocket_relay.worker")

PAYMENTS_INTERVAL_S = 1.0


async def process_payments(pool: asyncpg.Pool, redis_client: Redis, settings: Settings, stop: asyncio.Event) -> None:
    scripts = BillingScripts(redis_client)
    keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
    processor = EventProcessor(pool, scripts, keys, failpoint=settings.failpoint)
    while not stop.is_set():
        try:
            handled = await processor.process_due(500, min_age_s=settings.stripe_sweep_delay_s)
            if handled:
                log.info("processed %d Stripe event(s) left behind", handled)
            await retry_live_credits(pool, scripts, keys)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, redis.exceptions.RedisError) as exc:
            log.warning("payments pass failed (%s); retrying", type(exc).__name__)
        await sleep_unless_stopped(stop, PAYMENTS_INTERVAL_S)

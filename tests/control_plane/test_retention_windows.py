"""Retention end to end, with the windows read from `docs/data-processing.md` (which the data-map test ties
to the settings): a request log past the org's retention is gone while the usage record of the same request
is kept for the billing window; refresh sessions carry the refresh TTL; a crashed request's reservation is
released once the reservation TTL has passed. The clocks are injected (the retention pass's `now`, the
reserve script's `now_ms`)."""

from __future__ import annotations

import datetime
import re
import secrets

from shared.billing import BillingScripts, reserve_call
from shared.settings import Settings
from shared.workers.retention import run_retention_pass
from tests.conftest import Factory, ensure_partitions
from tests.control_plane.conftest import Portal
from tests.test_data_map import MAP

UTC = datetime.UTC


def window(env: str) -> int:
    """The number the map states for a setting, in its unit."""
    line = next(line for line in MAP.read_text().splitlines() if f"`{env}`" in line)
    found = re.search(r"\|\s*([\d,]+) (?:days|s)\s*\|\s*$", line)
    assert found is not None, line
    return int(found.group(1).replace(",", ""))


async def _rows(db, org_id: int, created: datetime.datetime) -> str:
    request_id = secrets.token_hex(12)
    await db.execute(
        """insert into request_logs (created_at, request_id, org_id, path, method, status_code, stream, latency_ms)
           values ($1, $2, $3, '/v1/chat/completions', 'POST', 200, false, 1)""", created, request_id, org_id)
    await db.execute(
        """insert into usage_records (created_at, request_id, org_id, api_key_id, model, prompt_tokens,
                                      completion_tokens, cost_micros) values ($1, $2, $3, 1, 'm', 1, 1, 1)""",
        created, request_id, org_id)
    return request_id


async def test_request_logs_go_at_the_orgs_retention_and_usage_records_stay(
    factory: Factory, db, settings: Settings,
) -> None:
    days = window("RR_LOG_RETENTION_DEFAULT_DAYS")
    assert days == settings.log_retention_default_days and window("RR_USAGE_RETENTION_DAYS") > days
    # The pass's clock is injected; it is the test's own now, so that rows of other tests (written today, in the
    # same database) are inside every window.
    now = datetime.datetime.now(UTC)
    org_id = await factory.org()  # no retention of its own: the default
    old, recent = now - datetime.timedelta(days=days + 1), now - datetime.timedelta(days=days - 1)
    await ensure_partitions(db, "request_logs", old, recent)
    await ensure_partitions(db, "usage_records", old, recent)
    gone, kept = await _rows(db, org_id, old), await _rows(db, org_id, recent)
    await run_retention_pass(db, settings, wait=True, batch_pause_s=0, now=now)
    logs = {r["request_id"] for r in await db.fetch("select request_id from request_logs where org_id = $1", org_id)}
    usage = {r["request_id"] for r in await db.fetch("select request_id from usage_records where org_id = $1", org_id)}
    assert logs == {kept}
    assert usage == {gone, kept}  # billing evidence outlives the request log


async def test_refresh_sessions_carry_the_refresh_ttl(portal: Portal, redis, settings: Settings) -> None:
    ttl = window("RR_REFRESH_TOKEN_TTL_S")
    assert ttl == settings.refresh_token_ttl_s
    pattern = f"{settings.redis_prefix}cp:sess:*"
    before = {key async for key in redis.scan_iter(match=pattern)}  # other tests' sessions, already ageing
    await portal.signup()
    new = {key async for key in redis.scan_iter(match=pattern)} - before
    ttls = [await redis.ttl(key) for key in new]
    assert ttls and all(ttl - 120 <= t <= ttl for t in ttls)  # the new session expires by itself


async def test_a_crashed_requests_reservation_goes_after_the_reservation_ttl(factory: Factory, redis,
                                                                           redis_keys) -> None:
    ttl_ms = window("RR_RESERVATION_TTL_S") * 1000
    org_id = await factory.org(balance_micros=1_000_000)
    org = redis_keys.org(org_id)
    scripts = BillingScripts(redis)
    await redis.hset(org.balance, mapping={"balance": 1_000_000, "reserved": 0, "credit": 0, "epoch": "e"})
    start = 1_800_000_000_000  # injected clock (ms)

    async def reserve(request_id: str, now_ms: int) -> list:
        keys, args = reserve_call(org, request_id, 600_000, 1, 1, (0, 0, 0, 0), now_ms, ttl_ms, org.balance, 0,
                                  True, [], [])
        (answer,) = await scripts.reserve(keys=keys, args=args)  # one answer per request of the call
        return answer

    assert (await reserve("crashed", start))[0] == 3  # held, never settled
    assert (await reserve("second", start + ttl_ms - 1))[0] == 2  # still held a millisecond before its TTL
    assert (await reserve("third", start + ttl_ms + 1))[0] == 3  # past it: released, and the balance is free
    assert await redis.zrange(org.reservations, 0, -1) == [b"third:600000"]  # the crashed one is gone
    assert int(await redis.hget(org.balance, "reserved")) == 600_000

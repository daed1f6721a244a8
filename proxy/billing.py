"""Money on the hot path: one Redis call before forwarding (rate limits + reservation) and one after
(settlement + usage event). Both are Lua scripts in `shared/lua/`; see `shared.billing`.

The reservation holds the worst case: every body byte as a prompt token (a token is at least one byte)
plus `max_tokens` (or the configured cap) of output, at the price in force when the request started.
Settlement charges the real cost from the upstream's usage; without usage (a stream cut short) it charges a
documented estimate: prompt = body bytes / 4, completion = the number of content events forwarded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.errors import ProxyError
from shared.apikeys import KeyRecord
from shared.billing import BillingScripts, UsageEvent, lua_source, rebuild_balance
from shared.money import PriceVersion, format_usd, worst_case_micros
from shared.redis_keys import RedisKeys
from shared.redis_pipeline import LuaScript, PipelinedRedis
from shared.settings import Settings

__all__ = ["Biller", "InsufficientQuota", "RateLimited", "Reservation"]

log = logging.getLogger("rocket_relay.billing")
_encode_event = msgspec.msgpack.Encoder().encode
_RESERVE = LuaScript(lua_source("reserve"))
_SETTLE = LuaScript(lua_source("settle"))


class RateLimited(ProxyError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    limit = "requests"  # which limit: requests or tokens (per minute), for the metrics


class InsufficientQuota(ProxyError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class BillingUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "billing_unavailable"


class Reservation:
    """What settlement needs to know about a reservation made before forwarding."""

    __slots__ = ("amount", "epoch", "est_tokens", "key_id", "org_id", "price", "request_id", "spend_key",
                 "started_us", "window")

    def __init__(self, request_id: str, org_id: int, key_id: int, amount: int, est_tokens: int, window: int,
                 epoch: str, price: PriceVersion, started_us: int, spend_key: str) -> None:
        self.request_id = request_id
        self.org_id = org_id
        self.key_id = key_id
        self.amount = amount
        self.est_tokens = est_tokens
        self.window = window
        self.epoch = epoch
        self.price = price
        self.started_us = started_us
        self.spend_key = spend_key


def _reset_in(now: float) -> bytes:
    return f"{60 - int(now) % 60}s".encode()


class Biller:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: Redis, fast: PipelinedRedis,
                 keys: RedisKeys) -> None:
        self._settings = settings
        self._pool = pool
        self._keys = keys
        self._fast = fast  # the two hot-path scripts
        self._scripts = BillingScripts(redis)  # the rare ones (balance rebuild)
        self._ttl_ms = settings.reservation_ttl_s * 1000
        self._default_org_rpm = settings.default_org_rpm
        self._default_org_tpm = settings.default_org_tpm
        self._retries: set[asyncio.Task] = set()

    async def reserve(self, key: KeyRecord, request_id: str, prices: Sequence[PriceVersion], body_bytes: int,
                      max_output: int, started: float, headers: list[tuple[bytes, bytes]]) -> Reservation:
        """Check rate limits and hold the worst-case cost at the dearest of `prices` (the models a request may
        fall back to, each billed at its own); adds the x-ratelimit-* headers to `headers`."""
        amount = max(worst_case_micros(price, body_bytes, max_output) for price in prices)
        price = prices[0]
        est_tokens = -(-body_bytes // 4) + max_output
        window = int(started // 60)
        org = self._keys.org(key.org_id)
        spend_key = org.key_spend(key.key_id, time.strftime("%Y%m", time.gmtime(started)))
        keys = [org.balance, org.reservations, org.reservation_expiry, org.rate_window(window), spend_key]
        args = [request_id, amount, est_tokens, key.key_id, key.rpm_limit or 0, key.tpm_limit or 0,
                key.org_rpm_limit or self._default_org_rpm, key.org_tpm_limit or self._default_org_tpm,
                int(started * 1000), self._ttl_ms, key.monthly_spend_cap_micros or 0]
        try:
            reply = await self._fast.evalsha(_RESERVE, keys, args)
            if reply[0] == 0:  # no live balance yet (or Redis lost it): rebuild from PostgreSQL, then retry
                if await rebuild_balance(self._pool, self._scripts, self._keys, key.org_id) is None:
                    raise BillingUnavailable("This organization has no balance account.")
                reply = await self._fast.evalsha(_RESERVE, keys, args)
        except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("reservation failed: %s", type(exc).__name__, extra={"request_id": request_id})
            raise BillingUnavailable("Billing is temporarily unavailable; the request was not forwarded.") from None
        status = reply[0]
        if status == 3:
            _, epoch, lim_r, rem_r, lim_t, rem_t = reply
            reset = _reset_in(started)
            if lim_r >= 0:
                headers += [(b"x-ratelimit-limit-requests", b"%d" % lim_r),
                            (b"x-ratelimit-remaining-requests", b"%d" % max(rem_r, 0)),
                            (b"x-ratelimit-reset-requests", reset)]
            if lim_t >= 0:
                headers += [(b"x-ratelimit-limit-tokens", b"%d" % lim_t),
                            (b"x-ratelimit-remaining-tokens", b"%d" % max(rem_t, 0)),
                            (b"x-ratelimit-reset-tokens", reset)]
            return Reservation(request_id, key.org_id, key.key_id, amount, est_tokens, window,
                               epoch.decode() if isinstance(epoch, bytes) else str(epoch), price,
                               int(started * 1_000_000), spend_key)
        if status == 1:
            kind = reply[1].decode()
            reset = _reset_in(started)
            limit_headers = [(b"retry-after", reset[:-1]), (f"x-ratelimit-limit-{kind}".encode(), b"%d" % reply[2]),
                             (f"x-ratelimit-remaining-{kind}".encode(), b"%d" % max(reply[3], 0)),
                             (f"x-ratelimit-reset-{kind}".encode(), reset)]
            refusal = RateLimited(f"Rate limit reached: {reply[2]} {kind} per minute. Retry after {reset.decode()}.",
                                  code="rate_limit_exceeded", headers=limit_headers)
            refusal.limit = "tokens" if kind == "tokens" else "requests"
            raise refusal
        if status == 4:
            raise InsufficientQuota(
                f"This API key reached its monthly spend cap of ${format_usd(reply[1])} "
                f"(${format_usd(reply[2])} spent or reserved this month).", code="spend_cap_reached")
        raise InsufficientQuota(
            f"Insufficient balance: this request may cost up to ${format_usd(amount)} and "
            f"${format_usd(max(reply[1], 0))} is available. Add funds to continue.",
        )

    async def settle(self, res: Reservation, event: UsageEvent | None, actual_tokens: int) -> int:
        """Release the reservation and debit `event.cost_micros` (nothing for a failed request).

        Returns the cost charged. Redis failures are retried in the background until the reservation would
        expire: the settle script is idempotent, so a retry never charges twice.
        """
        org = self._keys.org(res.org_id)
        cost = event.cost_micros if event is not None else 0
        keys = [org.balance, org.reservations, org.reservation_expiry, org.rate_window(res.window), org.stream,
                res.spend_key]
        args = [res.request_id, cost, actual_tokens - res.est_tokens, res.key_id, res.org_id, res.epoch,
                _encode_event(event) if event is not None else b""]  # no event: a failed request, release only
        try:
            await self._fast.evalsha(_SETTLE, keys, args)
        except (RedisError, OSError) as exc:
            log.error("settlement of %s failed (%s: %s); retrying in the background", res.request_id,
                      type(exc).__name__, exc, extra={"request_id": res.request_id})
            task = asyncio.create_task(self._retry_settle(keys, args))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
        return cost

    async def _retry_settle(self, keys: list, args: list) -> None:
        deadline = time.monotonic() + self._settings.reservation_ttl_s - self._settings.max_request_duration_s
        delay = 0.1
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            try:
                await self._fast.evalsha(_SETTLE, keys, args)
                return
            except (RedisError, OSError):
                delay = min(delay * 2, 5.0)
        log.error("settlement abandoned after retries: request %s", args[0], extra={"request_id": args[0]})

    async def close(self) -> None:
        """Wait briefly for background settlement retries (graceful shutdown)."""
        if self._retries:
            await asyncio.wait(self._retries, timeout=5.0)

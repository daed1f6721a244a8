"""Money on the hot path: one script call before forwarding (rate limits + reservation) and one after
(settlement + usage event), each shared with the other requests of the same event-loop turn
(`proxy.script_batches`). Both are Lua scripts in `shared/lua/`; see `shared.billing`.

The reservation holds the worst case: every body byte as a prompt token (a token is at least one byte)
plus `max_tokens` (or the configured cap) of output, at the price in force when the request started.
Settlement charges the real cost from the upstream's usage; without usage (a stream cut short) it charges
the estimate of `proxy.estimate` (the model's tokenizer on the prompt, the content the client received).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Coroutine, Sequence
from zoneinfo import ZoneInfo

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.errors import ProxyError
from proxy.script_batches import ScriptBatches
from shared.apikeys import KeyRecord
from shared.billing import (
    RESERVE_SWEEP_ARG,
    BillingScripts,
    UsageEvent,
    batch_call,
    lua_source,
    rebuild_balance,
    reserve_entry,
    settle_call,
    settle_entry,
)
from shared.budgets import Budget, BudgetCalendar, rolling_bucket
from shared.money import PriceVersion, format_usd, worst_case_micros
from shared.redis_keys import RedisKeys
from shared.redis_pipeline import LuaScript, PipelinedRedis
from shared.settings import Settings

__all__ = ["Biller", "BudgetExceeded", "InsufficientQuota", "RateLimited", "Reservation"]

log = logging.getLogger("rocket_relay.billing")
_encode_event = msgspec.msgpack.Encoder().encode
_RESERVE = LuaScript(lua_source("reserve"))
_SETTLE = LuaScript(lua_source("settle"))
_ROLLING_NAMES = {"day": "24 hours", "week": "7 days", "month": "30 days"}


class RateLimited(ProxyError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    limit = "requests"  # which limit: requests or tokens (per minute), for the metrics


class InsufficientQuota(ProxyError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class BudgetExceeded(InsufficientQuota):
    """A key's or org's budget for the period has no room for this request; `details` names the budget."""

    code = "budget_exceeded"


class BillingUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "billing_unavailable"


class Reservation:
    """What settlement needs to know about a reservation made before forwarding."""

    __slots__ = ("amount", "budget_buckets", "budget_keys", "epoch", "est_tokens", "key_id", "org_id", "price",
                 "request_id", "spend_capped", "spend_key", "started_us", "window")

    def __init__(self, request_id: str, org_id: int, key_id: int, amount: int, est_tokens: int, window: int,
                 epoch: str, price: PriceVersion, started_us: int, spend_key: str, spend_capped: bool,
                 budget_keys: list[str] | None = None, budget_buckets: list[str] | None = None) -> None:
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
        self.spend_capped = spend_capped
        # The budget counters this reservation was counted in, and for rolling ones the bucket ('' calendar).
        self.budget_keys = budget_keys or []
        self.budget_buckets = budget_buckets or []


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
        self._calendar = BudgetCalendar(ZoneInfo(settings.budget_timezone))
        self._retries: set[asyncio.Task] = set()
        self._next_sweep: dict[int, float] = {}  # org id -> when this process next sweeps its reservations
        self._reserves = ScriptBatches(fast, _RESERVE)
        self._settles = ScriptBatches(fast, _SETTLE)

    async def reserve(self, key: KeyRecord, request_id: str, prices: Sequence[PriceVersion], body_bytes: int,
                      max_output: int, started: float, headers: list[tuple[bytes, bytes]]) -> Reservation:
        """Check rate limits and hold the worst-case cost at the dearest of `prices` (the models a request may
        fall back to, each billed at its own); adds the x-ratelimit-* headers to `headers`."""
        amount = max(worst_case_micros(price, body_bytes, max_output) for price in prices)
        price = prices[0]
        est_tokens = -(-body_bytes // 4) + max_output
        now_ms = int(started * 1000)
        window = now_ms // 60_000
        org = self._keys.org(key.org_id)
        spend_cap = key.monthly_spend_cap_micros or 0
        # Without a cap the script never touches the spend key: the balance key stands in (same slot).
        spend_key = (org.key_spend(key.key_id, time.strftime("%Y%m", time.gmtime(started))) if spend_cap
                     else org.balance)
        budget_keys: list[str] = []
        budget_buckets: list[str] = []
        budget_args: list = []
        for budget in key.budgets or ():
            self._budget_args(budget, key, started, budget_keys, budget_buckets, budget_args)
        # Expired reservations (of a proxy that died) are swept about once a second per org and process.
        sweep = self._next_sweep.get(key.org_id, 0.0) <= started
        if sweep:
            if len(self._next_sweep) > 100_000:
                self._next_sweep.clear()
            self._next_sweep[key.org_id] = started + 1.0
        entry = reserve_entry(
            org, request_id, amount, est_tokens, key.key_id,
            (key.rpm_limit or 0, key.tpm_limit or 0, key.org_rpm_limit or self._default_org_rpm,
             key.org_tpm_limit or self._default_org_tpm),
            now_ms, self._ttl_ms, spend_key, spend_cap, sweep, budget_keys, budget_args)

        def release() -> None:
            # Held or maybe held, and nobody will settle it: released in the background. Settle without an
            # event is idempotent, and changes nothing when nothing was held.
            self._in_background(self._retry_settle(request_id, *settle_call(
                org, request_id, amount, 0, 0, key.key_id, "", b"", window, spend_key, spend_cap > 0,
                budget_keys, budget_buckets)))

        def orphaned(answer: list) -> None:  # the request was cancelled while its reservation was made
            if answer[0] == 3:
                release()

        try:
            reply = await self._reserves.call(org.tag, entry, orphaned)
            if reply[0] == 0:  # no live balance yet (or Redis lost it): rebuild from PostgreSQL, then retry
                if await rebuild_balance(self._pool, self._scripts, self._keys, key.org_id) is None:
                    raise BillingUnavailable("This organization has no balance account.")
                reply = await self._reserves.call(org.tag, entry, orphaned)
            if reply[0] == 2 and not sweep:  # refused for the balance: never because of a dead proxy's hold
                entry[1][RESERVE_SWEEP_ARG] = 1
                reply = await self._reserves.call(org.tag, entry, orphaned)
        except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The reason, cut short: Redis and PostgreSQL errors name keys and states, never a secret.
            log.warning("reservation failed: %s: %.160s", type(exc).__name__, exc, extra={"request_id": request_id})
            if isinstance(exc, RedisError | OSError):
                # The reply is lost, not necessarily the reservation (Redis may have run the script and died
                # before answering, with it in its append-only file).
                release()
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
                               int(started * 1_000_000), spend_key, spend_cap > 0, budget_keys,
                               budget_buckets)
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
        if status == 5:
            raise _budget_exceeded(key.budgets[reply[1] - 1], reply[2], reply[3], reply[4], amount, started,
                                   self._calendar.zone)
        if status == 4:
            raise InsufficientQuota(
                f"This API key reached its monthly spend cap of ${format_usd(reply[1])} "
                f"(${format_usd(reply[2])} spent or reserved this month).", code="spend_cap_reached")
        raise InsufficientQuota(
            f"Insufficient balance: this request may cost up to ${format_usd(amount)} and "
            f"${format_usd(max(reply[1], 0))} is available. Add funds to continue.",
        )

    def _budget_args(self, budget: Budget, key: KeyRecord, now: float, keys: list[str], buckets: list[str],
                     args: list) -> None:
        """Append one budget's counter key and its four script arguments (see shared/lua/reserve.lua)."""
        org = self._keys.org(key.org_id)
        scope = "o" if budget.scope == "org" else f"k{key.key_id}"
        if budget.window == "calendar":
            period = self._calendar.period(now, budget.period)
            keys.append(org.budget_calendar(scope, budget.period, period.label))
            buckets.append("")
            lifetime_s = math.ceil(period.end - now) + self._settings.reservation_ttl_s
            args += ["c", budget.limit_micros, lifetime_s, int(period.end * 1000)]
        else:
            bucket, bucket_ms = rolling_bucket(now, budget.period)
            keys.append(org.budget_rolling(scope, budget.period))
            buckets.append(str(bucket))
            args += ["r", budget.limit_micros, bucket, bucket_ms]

    async def settle(self, res: Reservation, event: UsageEvent | None, actual_tokens: int) -> int:
        """Release the reservation and debit `event.cost_micros` (nothing for a failed request).

        Returns the cost charged. Redis failures are retried in the background until the reservation would
        expire: the settle script is idempotent, so a retry never charges twice.
        """
        cost = event.cost_micros if event is not None else 0
        org = self._keys.org(res.org_id)
        entry = settle_entry(
            org, res.request_id, res.amount, cost, actual_tokens - res.est_tokens, res.key_id, res.epoch,
            _encode_event(event) if event is not None else b"",  # b"": release only
            res.window, res.spend_key, res.spend_capped, res.budget_keys, res.budget_buckets)
        try:
            await self._settles.call(org.tag, entry)
        except (RedisError, OSError) as exc:
            log.error("settlement of %s failed (%s: %s); retrying in the background", res.request_id,
                      type(exc).__name__, exc, extra={"request_id": res.request_id})
            self._in_background(self._retry_settle(res.request_id, *batch_call([entry])))
        return cost

    def _in_background(self, retry: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(retry)
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry_settle(self, request_id: str, keys: list, args: list) -> None:
        deadline = time.monotonic() + self._settings.reservation_ttl_s - self._settings.max_request_duration_s
        delay = 0.1
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            try:
                await self._fast.evalsha(_SETTLE, keys, args)
                return
            except (RedisError, OSError):
                delay = min(delay * 2, 5.0)
        log.error("settlement abandoned after retries: request %s", request_id, extra={"request_id": request_id})

    async def close(self) -> None:
        """Wait briefly for the script calls in flight and background settlement retries (graceful shutdown)."""
        await self._reserves.close()
        await self._settles.close()
        if self._retries:
            await asyncio.wait(self._retries, timeout=5.0)


def _budget_exceeded(budget: Budget, limit: int, spent: int, resets_ms: int, amount: int, now: float,
                     zone: ZoneInfo) -> BudgetExceeded:
    resets = datetime.datetime.fromtimestamp(resets_ms / 1000, datetime.UTC)
    resets_at = resets.isoformat().replace("+00:00", "Z")
    owner = "This API key's" if budget.scope == "key" else "This organization's"
    if budget.window == "calendar":
        which = f"{owner} budget for the calendar {budget.period} ({zone.key})"
    else:
        which = f"{owner} budget for a rolling {_ROLLING_NAMES[budget.period]}"
    if amount > limit:
        why = f"this request may cost up to ${format_usd(amount)}, more than the whole budget"
    else:
        why = (f"${format_usd(spent)} is spent or reserved and this request may cost up to "
               f"${format_usd(amount)}; it resets at {resets_at}")
    retry_after = max(1, math.ceil(resets_ms / 1000 - now))
    return BudgetExceeded(
        f"{which} of ${format_usd(limit)} is reached: {why}.",
        headers=[(b"retry-after", b"%d" % retry_after), (b"x-rr-budget-reset", resets_at.encode())],
        details={"budget": {"id": budget.budget_id, "scope": budget.scope, "period": budget.period,
                            "window": budget.window, "limit_micros": limit, "spent_micros": spent,
                            "resets_at": resets_at}},
    )

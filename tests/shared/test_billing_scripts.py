"""The billing Lua scripts, called directly: edge values and idempotency."""

from __future__ import annotations

import time

import pytest_asyncio

from shared.billing import BillingScripts, reserve_call, settle_call
from shared.redis_keys import RedisKeys

BIG = 10**15  # a billion dollars in micro-units: Lua must not write it as 1e+15


@pytest_asyncio.fixture
async def org(redis, settings):
    keys = RedisKeys(settings.redis_prefix + "scripts:", 4)
    org = keys.org(7)
    yield BillingScripts(redis), org
    for key in (org.balance, org.reservations, org.stream, org.pending_credits, org.applied_credits):
        await redis.delete(key)


async def _rebuild(scripts, org, balance: int, *included: str):
    return await scripts.rebuild(keys=[org.balance, org.reservations, org.stream, org.pending_credits,
                                       org.applied_credits], args=[balance, 0, "0-0", 7, "ep1", "0", *included])


HELD: dict[str, int] = {}  # request id -> what its reservation held (the settle names it by that)


async def _reserve(scripts, org, rid: str, amount: int):
    HELD[rid] = amount
    keys, args = reserve_call(org, rid, amount, 10, 1, (0, 0, 0, 0), int(time.time() * 1000), 60_000,
                              org.balance, 0, True, [], [])
    return await scripts.reserve(keys=keys, args=args)


async def _settle(scripts, org, rid: str, cost: int, payload: bytes = b"x", epoch: str = "ep1"):
    keys, args = settle_call(org, rid, HELD[rid], cost, 0, 1, epoch, payload, 0, org.balance, False, [], [])
    return await scripts.settle(keys=keys, args=args)


async def test_big_balances_and_zero_costs_stay_integers(org, redis) -> None:
    scripts, keys = org
    assert (await _rebuild(scripts, keys, BIG))[0] == 1
    assert int(await redis.hget(keys.balance, "balance")) == BIG
    assert (await _reserve(scripts, keys, "r1", BIG - 1))[0] == 3
    assert await _settle(scripts, keys, "r1", 0) == 1  # a zero cost must not become "-0"
    assert await _reserve(scripts, keys, "r2", 0) is not None
    assert await _settle(scripts, keys, "r2", 0, payload=b"") == 1
    state = await redis.hgetall(keys.balance)
    assert (int(state[b"balance"]), int(state[b"reserved"])) == (BIG, 0)


async def test_settle_twice_charges_once(org, redis) -> None:
    scripts, keys = org
    await _rebuild(scripts, keys, 1_000)
    await _reserve(scripts, keys, "r1", 500)
    assert await _settle(scripts, keys, "r1", 300) == 1
    assert await _settle(scripts, keys, "r1", 300) == 0
    assert int(await redis.hget(keys.balance, "balance")) == 700
    assert await redis.xlen(keys.stream) == 1


async def test_settle_after_redis_lost_the_reservation_still_bills(org, redis) -> None:
    scripts, keys = org
    await _rebuild(scripts, keys, 1_000)
    await _reserve(scripts, keys, "r1", 500)
    await redis.delete(keys.balance, keys.reservations)  # Redis lost the org's state
    assert await _settle(scripts, keys, "r1", 300) == 1  # no balance: the event alone carries the charge
    # The next rebuild (another epoch) subtracts the un-flushed event from the PostgreSQL balance.
    await scripts.rebuild(keys=[keys.balance, keys.reservations, keys.stream, keys.pending_credits,
                                keys.applied_credits], args=[1_000, 0, "0-0", 7, "ep2", "0"])
    assert int(await redis.hget(keys.balance, "balance")) == 700


async def test_reservation_refused_beyond_balance_plus_credit(org, redis) -> None:
    scripts, keys = org
    await scripts.rebuild(keys=[keys.balance, keys.reservations, keys.stream, keys.pending_credits,
                                keys.applied_credits], args=[100, 50, "0-0", 7, "ep1", "0"])
    assert (await _reserve(scripts, keys, "r1", 150))[0] == 3
    reply = await _reserve(scripts, keys, "r2", 1)
    assert reply[0] == 2 and reply[1] == 0


async def test_credit_is_applied_once_and_parked_without_a_balance(org, redis) -> None:
    scripts, keys = org
    credit_keys = [keys.balance, keys.pending_credits, keys.applied_credits]
    assert await scripts.credit(keys=credit_keys, args=["41", 250]) == 2  # no live balance: parked
    assert await scripts.credit(keys=credit_keys, args=["41", 250]) == 0  # retried: nothing
    assert (await _rebuild(scripts, keys, 1_000))[1] == b"1250"  # snapshot without txn 41: add it
    assert await scripts.credit(keys=credit_keys, args=["42", -BIG]) == 1
    assert int(await redis.hget(keys.balance, "balance")) == 1250 - BIG
    await redis.delete(keys.balance, keys.applied_credits)
    await scripts.credit(keys=credit_keys, args=["43", 99])
    assert (await _rebuild(scripts, keys, 5_000, "43"))[1] == b"5000"  # snapshot holds txn 43 already
    assert await scripts.credit(keys=credit_keys, args=["43", 99]) == 0  # and a late apply is refused

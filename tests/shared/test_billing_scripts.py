"""The billing Lua scripts, called directly: edge values and idempotency."""

from __future__ import annotations

import time

import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.billing import BillingScripts, batch_call, reserve_call, settle_call, settle_entry
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
    (answer,) = await scripts.reserve(keys=keys, args=args)  # one answer per request of the call
    return answer


async def _settle(scripts, org, rid: str, cost: int, payload: bytes = b"x", epoch: str = "ep1"):
    keys, args = settle_call(org, rid, HELD[rid], cost, 0, 1, epoch, payload, 0, org.balance, False, [], [])
    (result,) = await scripts.settle(keys=keys, args=args)  # one result per request of the call
    return result


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


async def _reserve_at(scripts, org, rid: str, amount: int, now_ms: int, *, tokens: int = 10,
                      limits: tuple[int, int, int, int] = (0, 0, 0, 0), sweep: bool = True, ttl_ms: int = 60_000):
    HELD[rid] = amount
    keys, args = reserve_call(org, rid, amount, tokens, 1, limits, now_ms, ttl_ms, org.balance, 0, sweep, [], [])
    (answer,) = await scripts.reserve(keys=keys, args=args)  # one answer per request of the call
    return answer


async def test_rate_counters_count_per_minute_and_a_new_minute_starts_at_zero(org, redis) -> None:
    scripts, keys = org
    await _rebuild(scripts, keys, 10**9)
    minute = 29_000_000 * 60_000  # an injected clock: the start of some unix minute (ms)
    limits = (2, 0, 3, 0)  # the key: 2 requests a minute; the org: 3
    assert (await _reserve_at(scripts, keys, "a", 1, minute, limits=limits))[0] == 3
    assert (await _reserve_at(scripts, keys, "b", 1, minute + 59_999, limits=limits))[0] == 3
    assert await _reserve_at(scripts, keys, "c", 1, minute + 59_999, limits=limits) == [1, b"requests", 2, 0]
    assert (await _reserve_at(scripts, keys, "c", 1, minute + 60_000, limits=limits))[0] == 3  # the next minute
    state = await redis.hgetall(keys.balance)
    assert (state[b"w"], state[b"o:r"], state[b"k1:r"]) == (b"%d" % (minute // 60_000 + 1), b"1", b"1")


async def test_token_counters_are_corrected_at_settlement_only_in_their_own_minute(org, redis) -> None:
    scripts, keys = org
    await _rebuild(scripts, keys, 10**9)
    minute = 29_000_000 * 60_000
    window = minute // 60_000
    limits = (0, 1_000, 0, 5_000)
    await _reserve_at(scripts, keys, "a", 1, minute, tokens=900, limits=limits)
    s_keys, s_args = settle_call(keys, "a", 1, 1, -800, 1, "ep1", b"x", window, keys.balance, False, [], [])
    assert await scripts.settle(keys=s_keys, args=s_args) == [1]
    assert [int(v) for v in await redis.hmget(keys.balance, "o:t", "k1:t")] == [100, 100]
    reply = await _reserve_at(scripts, keys, "b", 1, minute + 1, tokens=950, limits=limits)
    assert reply[0] == 1 and reply[1:] == [b"tokens", 1_000, 900]  # the key's minute has 900 left
    await _reserve_at(scripts, keys, "c", 1, minute + 60_000, tokens=300, limits=limits)  # a new minute
    s_keys, s_args = settle_call(keys, "c", 1, 1, -100, 1, "ep1", b"x", window, keys.balance, False, [], [])
    await scripts.settle(keys=s_keys, args=s_args)  # settled as of the old minute: the new one is untouched
    assert [int(v) for v in await redis.hmget(keys.balance, "o:t", "k1:t")] == [300, 300]


async def test_expired_reservations_are_released_only_by_a_sweeping_reserve(org, redis) -> None:
    scripts, keys = org
    await _rebuild(scripts, keys, 1_000)
    now = 1_800_000_000_000
    assert (await _reserve_at(scripts, keys, "dead", 900, now, ttl_ms=1_000))[0] == 3
    assert (await _reserve_at(scripts, keys, "x", 200, now + 5_000, sweep=False))[0] == 2  # still held
    assert (await _reserve_at(scripts, keys, "x", 200, now + 5_000, sweep=True))[0] == 3
    assert int(await redis.hget(keys.balance, "reserved")) == 200
    assert await _settle(scripts, keys, "dead", 900) == 0  # the dead request's late settle charges nothing
    assert int(await redis.hget(keys.balance, "balance")) == 1_000


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["reserve", "settle", "settle-again", "expire"]),
                              st.integers(0, 5), st.integers(0, 400)), min_size=1, max_size=40))
async def test_reserved_is_always_the_sum_of_live_reservations(org, redis, ops) -> None:
    """Generated reserves, settles (some retried) and proxy deaths: `reserved` equals what the live
    reservations hold, the balance is the start less each request's cost charged once, and a refusal is
    exactly when the request did not fit."""
    scripts, keys = org
    await redis.delete(keys.balance, keys.reservations, keys.stream)
    await _rebuild(scripts, keys, 1_000)
    now, live, settled, balance = 1_800_000_000_000, {}, set(), 1_000
    for n, (op, slot, amount) in enumerate(ops):
        rid = f"r{slot}"
        if op == "reserve" and rid not in live and rid not in settled:
            fits = amount <= balance - sum(live.values())
            reply = await _reserve_at(scripts, keys, rid, amount, now, ttl_ms=10_000)
            assert (reply[0] == 3) == fits
            if fits:
                live[rid] = amount
        elif op.startswith("settle") and rid in HELD and rid not in settled:
            cost = HELD[rid] // 2
            first = await _settle(scripts, keys, rid, cost)
            assert first == (1 if rid in live else 0)
            if rid in live:
                balance -= cost
                del live[rid]
            settled.add(rid)
            if op == "settle-again":
                assert await _settle(scripts, keys, rid, cost) == 0
        elif op == "expire":  # every live reservation's proxy died: the next sweeping reserve frees them
            now += 20_000
            await _reserve_at(scripts, keys, f"probe{n}", 0, now, ttl_ms=1)
            live.clear()
            settled.add(f"probe{n}")
        state = await redis.hgetall(keys.balance)
        held = {m.decode().rsplit(":", 1)[0]: int(m.decode().rsplit(":", 1)[1])
                for m in await redis.zrangebyscore(keys.reservations, now, "+inf")}
        assert int(state[b"reserved"]) == sum(held.values()) == sum(live.values())
        assert int(state[b"balance"]) == balance


async def test_one_call_settles_the_requests_of_several_orgs_of_a_shard_each_once(org, redis) -> None:
    scripts, keys = org
    other = RedisKeys(keys.tag.split("{")[0], 4).org(11)  # 11 mod 4 == 7 mod 4: the same shard, one slot
    assert other.tag == keys.tag
    await redis.delete(other.balance, other.reservations)
    for who in (keys, other):
        await scripts.rebuild(keys=[who.balance, who.reservations, who.stream, who.pending_credits,
                                    who.applied_credits], args=[1_000, 0, "0-0", who.org_id, "ep1", "0"])
    await _reserve(scripts, keys, "a", 100)
    await _reserve(scripts, other, "b", 200)
    await _reserve(scripts, keys, "c", 300)
    assert await _settle(scripts, keys, "c", 30) == 1  # settled before: the batch must not charge it again
    before = await redis.xlen(keys.stream)
    entries = [settle_entry(who, rid, HELD[rid], cost, 0, 1, "ep1", b"x", 0, who.balance, False, [], [])
               for who, rid, cost in ((keys, "a", 10), (other, "b", 20), (keys, "c", 30))]
    batch_keys, batch_args = batch_call(entries)
    assert await scripts.settle(keys=batch_keys, args=batch_args) == [1, 1, 0]
    assert [int(v) for v in await redis.hmget(keys.balance, "balance", "reserved")] == [1_000 - 40, 0]
    assert [int(v) for v in await redis.hmget(other.balance, "balance", "reserved")] == [1_000 - 20, 0]
    assert await redis.xlen(keys.stream) == before + 2
    await redis.delete(other.balance, other.reservations)

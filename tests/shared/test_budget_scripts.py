"""The budget part of the reserve and settle scripts, called directly with chosen instants: calendar counters,
rolling buckets leaving the window, the reset time a refusal reports, and settlement's correction."""

from __future__ import annotations

import secrets

import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.billing import BillingScripts, reserve_call, settle_call
from shared.budgets import rolling_bucket
from shared.redis_keys import RedisKeys

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


@pytest_asyncio.fixture
async def env(redis, settings):
    keys = RedisKeys(settings.redis_prefix + f"budgets-{secrets.token_hex(3)}:", 4)
    org = keys.org(9)
    scripts = BillingScripts(redis)
    await scripts.rebuild(keys=[org.balance, org.reservations, org.stream, org.pending_credits,
                                org.applied_credits], args=[10**12, 0, "0-0", 9, "ep1", "0"])
    yield scripts, org
    async for key in redis.scan_iter(match=keys.prefix + "*"):
        await redis.delete(key)


HELD: dict[str, int] = {}  # request id -> what its reservation held (the settle names it by that)


async def reserve(scripts, org, rid: str, amount: int, now_ms: int, budgets: list[tuple[str, list]]):
    """budgets: (counter key, [kind, limit, a, b]) as proxy.billing builds them."""
    HELD[rid] = amount
    keys, args = reserve_call(org, rid, amount, 1, 1, (0, 0, 0, 0), now_ms, 60_000, org.balance, 0, True,
                              [k for k, _ in budgets], [a for _, spec in budgets for a in spec])
    (answer,) = await scripts.reserve(keys=keys, args=args)  # one answer per request of the call
    return answer


async def settle(scripts, org, rid: str, cost: int, budgets: list[tuple[str, str]]):
    keys, args = settle_call(org, rid, HELD[rid], cost, 0, 1, "ep1", b"x", 0, org.balance, False,
                             [k for k, _ in budgets], [f for _, f in budgets])
    (result,) = await scripts.settle(keys=keys, args=args)  # one result per request of the call
    return result


def rolling(org, now_ms: int, limit: int, period: str = "day"):
    bucket, bucket_ms = rolling_bucket(now_ms / 1000, period)
    return (org.budget_rolling("o", period), ["r", limit, bucket, bucket_ms]), str(bucket)


async def test_a_calendar_budget_counts_reservations_and_settlement_corrects_them(env, redis) -> None:
    scripts, org = env
    counter = org.budget_calendar("k1", "day", "20270314")
    spec = (counter, ["c", 1_000, 90_000, 1_773_547_200_000])
    assert (await reserve(scripts, org, "a", 600, 0, [spec]))[0] == 3
    refused = await reserve(scripts, org, "b", 500, 0, [spec])
    assert refused == [5, 1, 1_000, 600, 1_773_547_200_000]  # which budget, limit, spent, reset (ms)
    assert int(await redis.get(counter)) == 600  # the refusal counted nothing
    assert await settle(scripts, org, "a", 250, [(counter, "")]) == 1
    assert int(await redis.get(counter)) == 250  # corrected to the real cost
    assert 0 < await redis.ttl(counter) <= 90_000
    assert (await reserve(scripts, org, "b", 500, 0, [spec]))[0] == 3
    assert await settle(scripts, org, "b", 500, [(counter, "")]) == 1
    assert await settle(scripts, org, "b", 500, [(counter, "")]) == 0  # a retried settle corrects once
    assert int(await redis.get(counter)) == 750


async def test_every_budget_is_checked_before_any_is_counted(env, redis) -> None:
    scripts, org = env
    day = (org.budget_calendar("o", "day", "20270314"), ["c", 10_000, 90_000, 1])
    week = (org.budget_calendar("o", "week", "20270308"), ["c", 700, 900_000, 2])
    (roll, spec), _ = rolling(org, 5 * DAY_MS, 10_000)
    assert (await reserve(scripts, org, "a", 500, 5 * DAY_MS, [day, (roll, spec), week]))[0] == 3
    reply = await reserve(scripts, org, "b", 500, 5 * DAY_MS, [day, (roll, spec), week])
    assert reply[:2] == [5, 3]  # the third budget (the week) refused
    assert int(await redis.get(day[0])) == 500 and sum(map(int, (await redis.hgetall(roll)).values())) == 500


async def test_rolling_spend_leaves_the_window_24_buckets_later_and_the_reset_says_when(env, redis) -> None:
    scripts, org = env
    t0 = 1_000 * DAY_MS + 10 * 60_000  # 00:10 of some day: bucket boundaries are whole hours for a day window
    (roll, spec0), f0 = rolling(org, t0, 1_000)
    assert (await reserve(scripts, org, "a", 400, t0, [(roll, spec0)]))[0] == 3
    t1 = t0 + 5 * HOUR_MS
    (_, spec1), f1 = rolling(org, t1, 1_000)
    assert (await reserve(scripts, org, "b", 400, t1, [(roll, spec1)]))[0] == 3
    await settle(scripts, org, "a", 400, [(roll, f0)])
    await settle(scripts, org, "b", 300, [(roll, f1)])  # rolling buckets are corrected too
    assert {k.decode(): int(v) for k, v in (await redis.hgetall(roll)).items()} == {f0: 400, f1: 300}
    # 20 h later: 700 spent; 400 more does not fit until the first bucket (t0's hour) leaves the window.
    t2 = t0 + 20 * HOUR_MS
    (_, spec2), _ = rolling(org, t2, 1_000)
    reply = await reserve(scripts, org, "c", 400, t2, [(roll, spec2)])
    first_bucket_start = t0 - 10 * 60_000
    assert reply == [5, 1, 1_000, 700, first_bucket_start + DAY_MS]
    # 800 needs both buckets gone: the second one's hour + 24 h.
    reply = await reserve(scripts, org, "c", 800, t2, [(roll, spec2)])
    assert reply[4] == first_bucket_start + 5 * HOUR_MS + DAY_MS
    # A request dearer than the whole budget never fits: the reset is when everything has left.
    reply = await reserve(scripts, org, "c", 1_001, t2, [(roll, spec2)])
    assert reply[4] == (int(spec2[2]) + 24) * HOUR_MS
    # At the reset, the first bucket is out (and dropped from the hash): 400 fits.
    t3 = first_bucket_start + DAY_MS
    (_, spec3), f3 = rolling(org, t3, 1_000)
    assert (await reserve(scripts, org, "c", 400, t3, [(roll, spec3)]))[0] == 3
    assert set(k.decode() for k in await redis.hgetall(roll)) == {f1, f3}
    # A settle after its bucket left the window does not bring the bucket back.
    await redis.hdel(roll, f3)
    await settle(scripts, org, "c", 100, [(roll, f3)])
    assert f3.encode() not in await redis.hgetall(roll)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(1, 400), st.integers(0, 3 * HOUR_MS), st.floats(0, 1)),
                    min_size=1, max_size=40),
       limit=st.integers(1, 3_000))
async def test_rolling_spend_in_the_window_never_passes_the_limit(env, redis, ops, limit: int) -> None:
    """Generated reservations at increasing instants, each settled at a fraction of what it held: at every
    moment, the spend whose bucket is in the window (the model) is at most the limit, and equals the hash."""
    scripts, org = env
    roll = org.budget_rolling("o", "week")
    await redis.delete(roll)
    now, held = 50 * DAY_MS, {}
    model: dict[int, int] = {}
    for i, (amount, step, fraction) in enumerate(ops):
        now += step
        bucket, bucket_ms = rolling_bucket(now / 1000, "week")
        model = {b: v for b, v in model.items() if b > bucket - 24}
        reply = await reserve(scripts, org, f"r{i}", amount, now, [(roll, ["r", limit, bucket, bucket_ms])])
        if sum(model.values()) + amount <= limit:
            assert reply[0] == 3
            cost = int(amount * fraction)
            await settle(scripts, org, f"r{i}", cost, [(roll, str(bucket))])
            model[bucket] = model.get(bucket, 0) + cost
            held[i] = cost
        else:
            assert reply[0] == 5 and reply[3] == sum(model.values())
        assert sum(model.values()) <= limit
        live = {int(k): int(v) for k, v in (await redis.hgetall(roll)).items() if int(k) > bucket - 24}
        assert {b: v for b, v in live.items() if v} == {b: v for b, v in model.items() if v}

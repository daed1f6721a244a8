"""`LoginLimiter` as a unit, on the real Redis, with an injected clock instead of waiting for windows."""

from __future__ import annotations

import secrets

import msgspec
import pytest
from redis.asyncio import Redis

from control_plane.limits import LoginLimiter
from control_plane.redis_keys import ControlPlaneKeys
from shared.settings import Settings

WINDOW = 900


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(1_800_000_000.0 + 100)  # 100 s into a window


@pytest.fixture
def limiter(settings: Settings, redis: Redis, clock: Clock) -> LoginLimiter:
    tuned = msgspec.structs.replace(settings, login_window_s=WINDOW, login_max_failures_per_ip_email=10,
                                    login_max_failures_per_ip=50, login_max_failures_per_email=30)
    # A prefix of its own: counters of other tests (and runs) share no key with these.
    return LoginLimiter(tuned, redis, ControlPlaneKeys(f"{settings.redis_prefix}lim{secrets.token_hex(4)}:"), clock)


def _email() -> str:
    return f"victim-{secrets.token_hex(4)}@example.com"


async def _fail(limiter: LoginLimiter, ip: str, email: str, times: int) -> None:
    for _ in range(times):
        await limiter.record_failure(ip, email)


async def test_one_address_guessing_one_email_is_blocked_and_nobody_else(limiter: LoginLimiter) -> None:
    email = _email()
    await _fail(limiter, "198.51.100.1", email, 9)
    assert await limiter.blocked_for("198.51.100.1", email) == 0
    await _fail(limiter, "198.51.100.1", email, 1)
    assert await limiter.blocked_for("198.51.100.1", email) == WINDOW - 100  # until the window ends
    assert await limiter.blocked_for("198.51.100.2", email) == 0  # the owner, elsewhere
    assert await limiter.blocked_for("198.51.100.1", _email()) == 0  # the attacker, for other accounts
    assert await limiter.blocked_for("198.51.100.1", email.upper()) > 0  # emails are case-insensitive


async def test_blocks_end_with_their_window(limiter: LoginLimiter, clock: Clock) -> None:
    email = _email()
    await _fail(limiter, "198.51.100.1", email, 10)
    clock.now += WINDOW - 101
    assert await limiter.blocked_for("198.51.100.1", email) == 1
    clock.now += 1
    assert await limiter.blocked_for("198.51.100.1", email) == 0


async def test_one_address_spraying_many_emails_is_blocked_for_all(limiter: LoginLimiter) -> None:
    for _ in range(50):
        await limiter.record_failure("198.51.100.9", _email())
    assert await limiter.blocked_for("198.51.100.9", _email()) > 0
    assert await limiter.blocked_for("198.51.100.10", _email()) == 0


async def test_many_addresses_on_one_email_get_one_guess_each_and_the_owner_still_gets_in(
    limiter: LoginLimiter,
) -> None:
    email = _email()
    for i in range(30):  # login_max_failures_per_email, from 30 addresses with a failure each
        await limiter.record_failure(f"203.0.113.{i}", email)
    assert all([await limiter.blocked_for(f"203.0.113.{i}", email) > 0 for i in range(30)])
    assert await limiter.blocked_for("203.0.113.200", email) == 0  # an address with no failures: the owner's
    await limiter.record_failure("203.0.113.200", email)
    assert await limiter.blocked_for("203.0.113.200", email) > 0
    assert await limiter.blocked_for("203.0.113.200", _email()) == 0  # other accounts unaffected


async def test_a_success_clears_that_address_only(limiter: LoginLimiter) -> None:
    email = _email()
    for i in range(10):
        await limiter.record_failure(f"203.0.113.{i}", email)
    await _fail(limiter, "192.0.2.1", email, 9)
    await limiter.record_success("192.0.2.1", email)
    await _fail(limiter, "192.0.2.1", email, 9)
    assert await limiter.blocked_for("192.0.2.1", email) == 0  # its own 9 earlier failures were forgiven
    # ... but not the email's count: 10 + 18 so far, and 2 more put it under attack.
    for i in range(10, 12):
        await limiter.record_failure(f"203.0.113.{i}", email)
    assert await limiter.blocked_for("203.0.113.1", email) > 0


async def test_no_known_address_counts_as_one_address(limiter: LoginLimiter) -> None:
    email = _email()
    await _fail(limiter, None, email, 10)
    assert await limiter.blocked_for(None, email) > 0
    assert await limiter.blocked_for("198.51.100.1", email) == 0

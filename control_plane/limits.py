"""Login attempt limits in Redis, in fixed windows of `login_window_s`, counted three ways so that guessing
is slowed everywhere while nobody elsewhere can lock a user out:

- per (client IP, email), strict (`login_max_failures_per_ip_email`): one address guessing one account;
- per client IP across emails (`login_max_failures_per_ip`): one address spraying many accounts;
- per email across addresses (`login_max_failures_per_email`, higher): many addresses guessing one account.
  Past it the email is under attack, and from then until the window ends only addresses that have not yet
  failed for it may try: each attacking address gets one guess, and the owner, from an address of theirs
  with no failures, still logs in. A strict per-email lock would let anyone lock out anyone.

Only failures count, so frequent logins never lock anyone out; a success clears the failures of that
(address, email) pair only: the owner logging in does not reset an attack on their account. Unknown emails
are counted exactly like known ones, and a blocked attempt gets the same 429 (and Retry-After, the end of
the window) either way, so the limiter reveals nothing about which accounts exist. The check happens before
the password is verified: a blocked attempt costs no Argon2 work.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.asyncio import Redis

from control_plane.redis_keys import ControlPlaneKeys
from shared.settings import Settings

__all__ = ["LoginLimiter"]

# Count one failure. Race prevented: INCR then a separate EXPIRE could leave a counter without expiry
# (and the key in Redis forever) if the client died in between. The expiry is past the window's end, so a
# counter outlives the window it counts (the window is in the key name; the expiry only cleans up).
_FAIL = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class LoginLimiter:
    def __init__(self, settings: Settings, redis: Redis, keys: ControlPlaneKeys,
                 clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self._window = settings.login_window_s
        self._max_pair = settings.login_max_failures_per_ip_email
        self._max_ip = settings.login_max_failures_per_ip
        self._max_email = settings.login_max_failures_per_email
        self._fail = redis.register_script(_FAIL)

    def _now(self) -> tuple[int, int]:
        """(index of the current window, seconds until it ends, at least 1)."""
        now = self._clock()
        window = int(now // self._window)
        return window, max(1, int((window + 1) * self._window - now + 0.999))

    def _key_names(self, ip: str | None, email: str, window: int) -> tuple[str, str, str]:
        address = ip or "-"  # no address known: all such attempts count as one address
        keys = self._keys
        return (keys.login_failures_ip_email(address, email, window), keys.login_failures_ip(address, window),
                keys.login_failures_email(email, window))

    async def blocked_for(self, ip: str | None, email: str) -> int:
        """Seconds until another attempt is allowed; 0 when it is allowed now."""
        window, remaining = self._now()
        async with self._redis.pipeline(transaction=False) as pipe:  # GETs, not MGET: keys of several slots
            for key in self._key_names(ip, email, window):
                pipe.get(key)
            pair, by_ip, by_email = (int(n or 0) for n in await pipe.execute())
        if pair >= self._max_pair or by_ip >= self._max_ip or (by_email >= self._max_email and pair > 0):
            return remaining
        return 0

    async def record_failure(self, ip: str | None, email: str) -> None:
        window, _ = self._now()
        expiry = 2 * self._window
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in self._key_names(ip, email, window):
                await self._fail(keys=[key], args=[expiry], client=pipe)
            await pipe.execute()

    async def record_success(self, ip: str | None, email: str) -> None:
        window, _ = self._now()
        await self._redis.delete(self._key_names(ip, email, window)[0])

"""Login attempt limits, per client IP and per email, in Redis (fixed windows of `login_window_s`).

Only failures count, so a user who logs in often is never locked out by their own successes; a success
clears the email's counter. Unknown emails are counted exactly like known ones, and a blocked attempt gets
the same 429 either way, so the limiter reveals nothing about which accounts exist. The check happens
before the password is verified: a blocked attempt costs no Argon2 work.
"""

from __future__ import annotations

from redis.asyncio import Redis

from control_plane.redis_keys import ControlPlaneKeys
from shared.settings import Settings

__all__ = ["LoginLimiter"]

# Count one failure. Race prevented: INCR then a separate EXPIRE could leave a counter without expiry
# (and the email locked forever) if the client died in between.
_FAIL = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class LoginLimiter:
    def __init__(self, settings: Settings, redis: Redis, keys: ControlPlaneKeys) -> None:
        self._redis = redis
        self._keys = keys
        self._window = settings.login_window_s
        self._max_ip = settings.login_max_failures_per_ip
        self._max_email = settings.login_max_failures_per_email
        self._fail = redis.register_script(_FAIL)

    def _pairs(self, ip: str | None, email: str) -> list[tuple[str, int]]:
        pairs = [(self._keys.login_failures_email(email), self._max_email)]
        if ip:
            pairs.append((self._keys.login_failures_ip(ip), self._max_ip))
        return pairs

    async def blocked_for(self, ip: str | None, email: str) -> int:
        """Seconds until another attempt is allowed; 0 when it is allowed now."""
        pairs = self._pairs(ip, email)
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, _ in pairs:
                pipe.get(key)
                pipe.ttl(key)
            replies = await pipe.execute()
        wait = 0
        for i, (_, limit) in enumerate(pairs):
            count, ttl = replies[2 * i], replies[2 * i + 1]
            if count is not None and int(count) >= limit:
                wait = max(wait, ttl if ttl > 0 else self._window)
        return wait

    async def record_failure(self, ip: str | None, email: str) -> None:
        for key, _ in self._pairs(ip, email):
            await self._fail(keys=[key], args=[self._window])

    async def record_success(self, email: str) -> None:
        await self._redis.delete(self._keys.login_failures_email(email))

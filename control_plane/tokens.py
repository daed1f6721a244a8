"""Portal sessions: short-lived signed access tokens and rotating refresh sessions kept in Redis.

- Access token: a JWT (HS256) with the user id (`sub`) and the session family id (`sid`), valid for
  `access_token_ttl_s`. Every request also checks that its session family still exists, so logout,
  a password change or a detected token theft ends the access tokens of that family at once.
- Refresh token: `<family id>.<secret>`, opaque, shown to the client only. Redis keeps per family the hash
  of the one live secret and the hashes of every secret already rotated away. Each refresh swaps the live
  secret for a new one (one Lua call); presenting a rotated secret again means someone else holds a copy,
  so the whole family is deleted and both holders must log in again.
- The signing key is `RR_JWT_SECRET`, or, when unset, HKDF-SHA256 of the key pepper with a fixed label, so
  a deployment has one secret fewer to manage and changing the pepper (which already invalidates every API
  key) also ends every portal session.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.asyncio import Redis

from control_plane.redis_keys import ControlPlaneKeys
from shared.settings import Settings

__all__ = ["AccessClaims", "RefreshOutcome", "TokenService", "signing_key"]

_ISSUER = "rocket-relay-control-plane"

# Rotate a refresh session. Race prevented: the real client and a thief refreshing with the same secret at
# the same time — exactly one call finds it live; the other finds it rotated and ends the family.
# KEYS: the session hash. ARGV: presented secret hash, new secret hash, ttl seconds.
# Returns {1, user id} rotated; {0} unknown or ended family, or a secret never issued; {-1} reuse detected.
# (The user's set of family ids may keep an ended id; `end_user_sessions` tolerates that.)
_ROTATE = """
local sess = KEYS[1]
local presented, fresh, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cur = redis.call('HGET', sess, 'cur')
if not cur then return {0} end
if cur == presented then
  redis.call('HSET', sess, 'cur', fresh, 'u:' .. presented, '1')
  redis.call('EXPIRE', sess, ttl)
  return {1, redis.call('HGET', sess, 'user')}
end
if redis.call('HEXISTS', sess, 'u:' .. presented) == 1 then
  redis.call('DEL', sess)
  return {-1}
end
return {0}
"""


def signing_key(settings: Settings) -> bytes:
    if settings.jwt_secret:
        return settings.jwt_secret.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"rocket-relay control-plane access tokens v1").derive(settings.key_pepper.encode())


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class AccessClaims:
    __slots__ = ("session_id", "user_id")

    def __init__(self, user_id: int, session_id: str) -> None:
        self.user_id = user_id
        self.session_id = session_id


class RefreshOutcome:
    ROTATED = 1
    INVALID = 0
    REUSED = -1


class TokenService:
    def __init__(self, settings: Settings, redis: Redis, keys: ControlPlaneKeys) -> None:
        self._key = signing_key(settings)
        self._access_ttl = settings.access_token_ttl_s
        self._refresh_ttl = settings.refresh_token_ttl_s
        self._redis = redis
        self._keys = keys
        self._rotate = redis.register_script(_ROTATE)

    @property
    def access_ttl_s(self) -> int:
        return self._access_ttl

    def issue_access(self, user_id: int, session_id: str) -> str:
        now = int(time.time())
        claims = {"sub": str(user_id), "sid": session_id, "iat": now, "exp": now + self._access_ttl,
                  "iss": _ISSUER, "typ": "access"}
        return jwt.encode(claims, self._key, algorithm="HS256")

    def verify_access(self, token: str) -> AccessClaims | None:
        """The claims of a valid, unexpired access token; None for anything else."""
        try:
            claims = jwt.decode(token, self._key, algorithms=["HS256"], issuer=_ISSUER,
                                options={"require": ["exp", "iat", "sub", "sid"]})
        except jwt.PyJWTError:
            return None
        if claims.get("typ") != "access" or not str(claims["sub"]).isdigit() or not isinstance(claims["sid"], str):
            return None
        return AccessClaims(int(claims["sub"]), claims["sid"])

    async def session_alive(self, session_id: str) -> bool:
        return bool(await self._redis.exists(self._keys.session(session_id)))

    async def start_session(self, user_id: int) -> tuple[str, str]:
        """A new session family; returns (family id, refresh token)."""
        family = secrets.token_urlsafe(16)
        secret = secrets.token_urlsafe(32)
        session = self._keys.session(family)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(session, mapping={"user": str(user_id), "cur": _digest(secret), "created": int(time.time())})
            pipe.expire(session, self._refresh_ttl)
            pipe.sadd(self._keys.user_sessions(user_id), family)
            pipe.expire(self._keys.user_sessions(user_id), self._refresh_ttl)
            await pipe.execute()
        return family, f"{family}.{secret}"

    async def rotate(self, refresh_token: str) -> tuple[int, int | None, str | None, str | None]:
        """(outcome, user id, family id, new refresh token); user id and token only when ROTATED."""
        family, _, secret = refresh_token.partition(".")
        if not family or not secret or len(refresh_token) > 200:
            return RefreshOutcome.INVALID, None, None, None
        fresh = secrets.token_urlsafe(32)
        reply = await self._rotate(keys=[self._keys.session(family)],
                                   args=[_digest(secret), _digest(fresh), self._refresh_ttl])
        outcome = int(reply[0])
        if outcome != RefreshOutcome.ROTATED:
            return outcome, None, None, None
        return outcome, int(reply[1]), family, f"{family}.{fresh}"

    async def end_session(self, user_id: int, family: str) -> None:
        await self._redis.delete(self._keys.session(family))
        await self._redis.srem(self._keys.user_sessions(user_id), family)

    async def end_user_sessions(self, user_id: int, *, keep: str | None = None) -> int:
        """End every session family of a user except `keep`; returns how many ended."""
        user_set = self._keys.user_sessions(user_id)
        families = [f.decode() for f in await self._redis.smembers(user_set)]
        ended = [f for f in families if f != keep]
        if ended:
            # One key per command: the sessions of a user may live in different Redis Cluster slots.
            async with self._redis.pipeline(transaction=False) as pipe:
                for family in ended:
                    pipe.delete(self._keys.session(family))
                pipe.srem(user_set, *ended)
                await pipe.execute()
        return len(ended)

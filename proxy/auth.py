"""Authenticate `rr-…` API keys against a three-level cache: this process, Redis, PostgreSQL.

Per request, a warm key costs one dict lookup and one HMAC; Redis and PostgreSQL are touched only on a
miss. The Redis look-up goes through the pipelined hot-path client: with many active keys (each used less
often than the local TTL) nearly every request misses locally, and redis-py's ~100 µs per call would be most
of its cost. If Redis cannot answer, the key is read from PostgreSQL.

A key change (revocation, suspension, new limits) reaches this process through the events channel
(`proxy.events`), which evicts the entry; the short local TTL bounds staleness if a message is missed.
"""

from __future__ import annotations

import hmac
import time

import asyncpg
import msgspec
from redis.exceptions import RedisError

from proxy.errors import AuthenticationError
from shared.apikeys import KeyRecord, hash_api_key, load_key_record, parse_api_key
from shared.redis_keys import RedisKeys
from shared.redis_pipeline import PipelinedRedis

__all__ = ["Authenticator"]

_MAX_ENTRIES = 200_000  # bounds memory under a flood of random keys
_decode_record = msgspec.msgpack.Decoder(KeyRecord).decode
_encode_record = msgspec.msgpack.Encoder().encode


class Authenticator:
    __slots__ = ("_cache", "_keys", "_neg_ttl", "_pepper", "_pool", "_redis", "_redis_ttl", "_ttl")

    def __init__(self, pool: asyncpg.Pool, redis: PipelinedRedis, keys: RedisKeys, pepper: bytes, *,
                 ttl_s: float, negative_ttl_s: float, redis_ttl_s: int) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._pepper = pepper
        self._ttl = ttl_s
        self._neg_ttl = negative_ttl_s
        self._redis_ttl = redis_ttl_s
        # key prefix -> (valid until, record or None for "no such key")
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}

    async def authenticate(self, api_key: str | None) -> KeyRecord:
        """The key's record, or AuthenticationError (401) for a missing, unknown, revoked or expired key."""
        if not api_key:
            raise AuthenticationError(
                "Missing API key: send it as `Authorization: Bearer rr-…` or `x-api-key`.", code="missing_api_key"
            )
        prefix = parse_api_key(api_key)
        if prefix is None:
            raise AuthenticationError("Invalid API key.")
        entry = self._cache.get(prefix)
        now = time.monotonic()
        if entry is not None and entry[0] > now:
            record = entry[1]
        else:
            record = await self._fetch(prefix)
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            self._cache[prefix] = (now + (self._ttl if record else self._neg_ttl), record)
        # Constant-time comparison of the keyed hash: the prefix lookup alone proves nothing.
        if record is None or not hmac.compare_digest(hash_api_key(self._pepper, api_key), record.key_hash):
            raise AuthenticationError("Invalid API key.")
        if not record.active:
            raise AuthenticationError("This API key has been revoked or its organization is suspended.",
                                      code="api_key_revoked")
        if record.expires_at is not None and record.expires_at <= time.time():
            raise AuthenticationError("This API key has expired.", code="api_key_expired")
        return record

    def evict(self, key_prefix: str) -> None:
        self._cache.pop(key_prefix, None)

    def clear(self) -> None:
        self._cache.clear()

    async def _fetch(self, prefix: str) -> KeyRecord | None:
        redis_key = self._keys.api_key(prefix)
        try:
            cached = await self._redis.execute("GET", redis_key)
        except (RedisError, OSError):
            return await load_key_record(self._pool, prefix)
        if cached is not None:
            return _decode_record(cached)
        record = await load_key_record(self._pool, prefix)
        if record is not None:
            try:  # NX: never overwrite what a revocation wrote after our read (see shared.apikeys).
                await self._redis.execute("SET", redis_key, _encode_record(record), "EX", self._redis_ttl, "NX")
            except (RedisError, OSError):
                pass
        return record

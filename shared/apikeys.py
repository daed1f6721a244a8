"""API keys: generation, parsing, keyed hashing, and the cached record the proxy authenticates against.

A key is `rr-<prefix>_<secret>`. The prefix (8 chars) is public: it names the key in the portal and in
caches. PostgreSQL stores only the prefix and HMAC-SHA256(pepper, key); keys carry 190 bits of entropy, so a
fast keyed hash is enough (a slow password hash would only cost the hot path).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from datetime import datetime

import asyncpg
import msgspec

from shared.budgets import Budget

__all__ = [
    "KeyRecord",
    "create_api_key",
    "generate_api_key",
    "hash_api_key",
    "load_key_record",
    "parse_api_key",
    "publish_key_change",
    "publish_org_change",
    "revoke_api_key",
]

_ALPHABET = string.ascii_letters + string.digits
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_KEY_RE = re.compile(r"rr-([a-z0-9]{8})_([A-Za-z0-9]{32})")


def generate_api_key() -> str:
    """A new random key `rr-<8 lowercase/digits>_<32 letters/digits>`."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(32))
    return f"rr-{prefix}_{secret}"


def parse_api_key(key: str) -> str | None:
    """The key's prefix if it is well-formed, else None."""
    match = _KEY_RE.fullmatch(key)
    return match.group(1) if match else None


def hash_api_key(pepper: bytes, key: str) -> bytes:
    return hmac.new(pepper, key.encode(), hashlib.sha256).digest()


class KeyRecord(msgspec.Struct, frozen=True, array_like=True):
    """What the proxy needs to know about a key; cached in-process and in Redis (msgpack)."""

    key_id: int
    org_id: int
    key_hash: bytes
    active: bool  # false when revoked or when its org is suspended
    expires_at: float | None  # unix seconds
    rpm_limit: int | None
    tpm_limit: int | None
    allowed_models: list[str] | None
    org_rpm_limit: int | None
    org_tpm_limit: int | None
    monthly_spend_cap_micros: int | None = None
    # The key's own budgets, then its org's (shared.budgets): enforced by the reserve script.
    budgets: tuple[Budget, ...] = ()


_RECORD_SQL = """
select k.id, k.org_id, k.key_hash, (k.revoked_at is null and o.status = 'active') as active,
       extract(epoch from k.expires_at)::float8 as expires_at, k.rpm_limit, k.tpm_limit,
       k.allowed_models, o.rpm_limit as org_rpm_limit, o.tpm_limit as org_tpm_limit,
       k.monthly_spend_cap_micros
from api_keys k join orgs o on o.id = k.org_id
where k.prefix = $1
"""
_BUDGETS_SQL = """
select id, api_key_id, period, window_kind, limit_micros from budgets
where org_id = $1 and (api_key_id is null or api_key_id = $2)
order by api_key_id nulls last, id
"""


async def load_key_record(conn: asyncpg.Connection | asyncpg.Pool, key_prefix: str) -> KeyRecord | None:
    row = await conn.fetchrow(_RECORD_SQL, key_prefix)
    if row is None:
        return None
    budgets = tuple(Budget(b["id"], "org" if b["api_key_id"] is None else "key", b["period"], b["window_kind"],
                           b["limit_micros"]) for b in await conn.fetch(_BUDGETS_SQL, row["org_id"], row["id"]))
    return KeyRecord(
        key_id=row["id"], org_id=row["org_id"], key_hash=bytes(row["key_hash"]), active=row["active"],
        expires_at=row["expires_at"], rpm_limit=row["rpm_limit"], tpm_limit=row["tpm_limit"],
        allowed_models=row["allowed_models"], org_rpm_limit=row["org_rpm_limit"],
        org_tpm_limit=row["org_tpm_limit"], monthly_spend_cap_micros=row["monthly_spend_cap_micros"],
        budgets=budgets,
    )


async def create_api_key(
    conn: asyncpg.Connection | asyncpg.Pool,
    pepper: bytes,
    org_id: int,
    *,
    name: str = "",
    key: str | None = None,
    rpm_limit: int | None = None,
    tpm_limit: int | None = None,
    allowed_models: list[str] | None = None,
    expires_at: datetime | None = None,
    created_by: int | None = None,
    monthly_spend_cap_micros: int | None = None,
) -> tuple[int, str]:
    """Insert a key and return (id, full key). The full key exists only in this return value."""
    key = key or generate_api_key()
    prefix = parse_api_key(key)
    if prefix is None:
        raise ValueError("malformed API key")
    key_id = await conn.fetchval(
        """insert into api_keys (org_id, name, prefix, key_hash, rpm_limit, tpm_limit, allowed_models,
                                 expires_at, created_by, monthly_spend_cap_micros)
           values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) returning id""",
        org_id, name, prefix, hash_api_key(pepper, key), rpm_limit, tpm_limit, allowed_models,
        expires_at, created_by, monthly_spend_cap_micros,
    )
    return key_id, key


async def publish_key_change(redis, keys, pool: asyncpg.Pool, key_prefix: str, ttl_s: int) -> None:
    """Push a key's current state to every proxy: overwrite the Redis cache, then notify subscribers.

    Overwriting (rather than deleting) matters: a proxy that read the old row from PostgreSQL just before
    the change fills the cache with SET NX, which then fails instead of resurrecting the old state.
    """
    record = await load_key_record(pool, key_prefix)
    if record is None:
        await redis.delete(keys.api_key(key_prefix))
    else:
        await redis.set(keys.api_key(key_prefix), msgspec.msgpack.encode(record), ex=ttl_s)
    await redis.publish(keys.events_channel, f"key:{key_prefix}")


async def revoke_api_key(pool: asyncpg.Pool, redis, keys, key_id: int, ttl_s: int) -> bool:
    """Revoke a key; every proxy refuses it within seconds. False if it did not exist or was revoked."""
    prefix = await pool.fetchval(
        "update api_keys set revoked_at = now() where id = $1 and revoked_at is null returning prefix", key_id
    )
    if prefix is None:
        return False
    await publish_key_change(redis, keys, pool, prefix, ttl_s)
    return True


async def publish_org_change(redis, keys, pool: asyncpg.Pool, org_id: int, ttl_s: int) -> int:
    """Push the state of every unrevoked key of an org to every proxy (after a suspension, a resumption or
    new org-wide limits: each key's record carries them). Returns how many keys were published."""
    prefixes = [r["prefix"] for r in await pool.fetch(
        "select prefix from api_keys where org_id = $1 and revoked_at is null order by id", org_id)]
    for prefix in prefixes:
        await publish_key_change(redis, keys, pool, prefix, ttl_s)
    return len(prefixes)

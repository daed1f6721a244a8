"""The BYOK credentials of orgs (their own provider keys), decrypted and cached per org in this process.

Loaded on an org's first request and kept for `ttl_s` (most orgs have none: that is cached too); a
`byok:<org id>` or `config` event evicts them, so a changed credential applies within moments.
"""

from __future__ import annotations

import time

import asyncpg

from shared.crypto import SecretBox

__all__ = ["ByokCredentials"]

_SQL = """
select c.provider_id, s.id, s.kind, s.master_key_id, s.wrapped_key, s.ciphertext
from org_provider_credentials c join secrets s on s.id = c.secret_id
where c.org_id = $1
"""
_NONE: dict[int, str] = {}


class ByokCredentials:
    __slots__ = ("_box", "_cache", "_pool", "_ttl")

    def __init__(self, pool: asyncpg.Pool, box: SecretBox, *, ttl_s: float) -> None:
        self._pool = pool
        self._box = box
        self._ttl = ttl_s
        self._cache: dict[int, tuple[float, dict[int, str]]] = {}

    async def for_org(self, org_id: int) -> dict[int, str]:
        """provider id -> the org's credential for it (empty when the org has none)."""
        entry = self._cache.get(org_id)
        now = time.monotonic()
        if entry is not None and entry[0] > now:
            return entry[1]
        rows = await self._pool.fetch(_SQL, org_id)
        creds = {r["provider_id"]: self._box.open(r["id"], r["kind"], r["master_key_id"], r["wrapped_key"],
                                                  r["ciphertext"]).decode() for r in rows} or _NONE
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[org_id] = (now + self._ttl, creds)
        return creds

    def evict(self, org_id: int) -> None:
        self._cache.pop(org_id, None)

    def clear(self) -> None:
        self._cache.clear()

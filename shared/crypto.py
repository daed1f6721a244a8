"""Envelope encryption of stored secrets (provider and BYOK credentials, webhook secrets, SMTP/Stripe keys).

Each secret gets its own random 256-bit data key; the plaintext is sealed with AES-256-GCM under the data
key, and the data key is sealed under a master key named by id. The secret's row id and kind are the
associated data of both seals, so a ciphertext copied onto another row fails to open. Several master keys
can be loaded at once, which is what lets `rotate` re-wrap rows while old ones still decrypt.
"""

from __future__ import annotations

import os
import uuid

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["DecryptionError", "SecretBox", "box_from_settings", "load_secret", "rewrap_all", "store_secret"]

_NONCE = 12


class DecryptionError(Exception):
    """A secret could not be opened: tampered, moved to another row, or sealed under an unknown key."""


class SecretBox:
    """Seals and opens secrets; holds the master keys by id and the id new seals use."""

    __slots__ = ("_current_id", "_masters")

    def __init__(self, master_keys: dict[str, bytes], current_key_id: str) -> None:
        if current_key_id not in master_keys:
            raise ValueError(f"current master key id {current_key_id!r} is not among the loaded keys")
        for key_id, key in master_keys.items():
            if len(key) != 32:
                raise ValueError(f"master key {key_id!r} must be 32 bytes")
        self._masters = {k: AESGCM(v) for k, v in master_keys.items()}
        self._current_id = current_key_id

    @property
    def current_key_id(self) -> str:
        return self._current_id

    @staticmethod
    def _aad(secret_id: uuid.UUID, kind: str) -> bytes:
        return f"rr-secret:{secret_id}:{kind}".encode()

    def seal(self, secret_id: uuid.UUID, kind: str, plaintext: bytes) -> tuple[str, bytes, bytes]:
        """Return (master key id, wrapped data key, ciphertext)."""
        aad = self._aad(secret_id, kind)
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        ciphertext = nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad)
        return self._current_id, self._wrap(data_key, aad), ciphertext

    def open(self, secret_id: uuid.UUID, kind: str, key_id: str, wrapped: bytes, ciphertext: bytes) -> bytes:
        aad = self._aad(secret_id, kind)
        data_key = self._unwrap(key_id, wrapped, aad)
        try:
            return AESGCM(data_key).decrypt(ciphertext[:_NONCE], ciphertext[_NONCE:], aad)
        except InvalidTag:
            raise DecryptionError(f"secret {secret_id} failed authentication") from None

    def rewrap(self, secret_id: uuid.UUID, kind: str, key_id: str, wrapped: bytes) -> tuple[str, bytes]:
        """Re-seal a data key under the current master key; the ciphertext itself is untouched."""
        aad = self._aad(secret_id, kind)
        return self._current_id, self._wrap(self._unwrap(key_id, wrapped, aad), aad)

    def _wrap(self, data_key: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._masters[self._current_id].encrypt(nonce, data_key, aad)

    def _unwrap(self, key_id: str, wrapped: bytes, aad: bytes) -> bytes:
        master = self._masters.get(key_id)
        if master is None:
            raise DecryptionError(f"master key {key_id!r} is not loaded")
        try:
            return master.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], aad)
        except InvalidTag:
            raise DecryptionError("data key failed authentication") from None


async def store_secret(
    conn: asyncpg.Connection | asyncpg.Pool, box: SecretBox, kind: str, plaintext: str,
    *, org_id: int | None = None, hint: str = "",
) -> uuid.UUID:
    """Encrypt and insert a secret; return its id."""
    secret_id = uuid.uuid4()
    key_id, wrapped, ciphertext = box.seal(secret_id, kind, plaintext.encode())
    await conn.execute(
        """insert into secrets (id, kind, org_id, master_key_id, wrapped_key, ciphertext, hint)
           values ($1, $2, $3, $4, $5, $6, $7)""",
        secret_id, kind, org_id, key_id, wrapped, ciphertext, hint,
    )
    return secret_id


async def load_secret(conn: asyncpg.Connection | asyncpg.Pool, box: SecretBox, secret_id: uuid.UUID) -> str:
    row = await conn.fetchrow(
        "select kind, master_key_id, wrapped_key, ciphertext from secrets where id = $1", secret_id
    )
    if row is None:
        raise DecryptionError(f"secret {secret_id} does not exist")
    return box.open(secret_id, row["kind"], row["master_key_id"], row["wrapped_key"], row["ciphertext"]).decode()


def box_from_settings(master_key: bytes, master_key_id: str, old_keys: dict[str, bytes] | None = None) -> SecretBox:
    """The box every process builds at start-up from `Settings.master_key_bytes` / `master_key_id`
    (and `old_master_keys_map` during a rotation: old rows keep opening until re-wrapped)."""
    return SecretBox({**(old_keys or {}), master_key_id: master_key}, master_key_id)


async def rewrap_all(pool: asyncpg.Pool, box: SecretBox, *, batch: int = 500) -> int:
    """Re-wrap every secret not yet under the current master key; returns how many it re-wrapped.

    Only the small wrapped data key changes; ciphertexts stay. Each row is updated only if it still has the
    key id we read (a concurrent rotation or edit wins), so it is safe to run while everything serves.
    """
    done = 0
    while True:
        rows = await pool.fetch(
            "select id, kind, master_key_id, wrapped_key from secrets where master_key_id <> $1 limit $2",
            box.current_key_id, batch)
        if not rows:
            return done
        for row in rows:
            key_id, wrapped = box.rewrap(row["id"], row["kind"], row["master_key_id"], row["wrapped_key"])
            status = await pool.execute(
                """update secrets set master_key_id = $1, wrapped_key = $2, rotated_at = now()
                   where id = $3 and master_key_id = $4""", key_id, wrapped, row["id"], row["master_key_id"])
            done += status == "UPDATE 1"


def rotate_main() -> None:
    """`rr-rotate-master-key`: re-wrap all secrets under RR_MASTER_KEY (old keys in RR_OLD_MASTER_KEYS)."""
    import asyncio
    import sys

    from shared.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"rr-rotate-master-key: {exc}")
    box = box_from_settings(settings.master_key_bytes, settings.master_key_id, settings.old_master_keys_map)

    async def run() -> int:
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            return await rewrap_all(pool, box)
        finally:
            await pool.close()

    try:
        count = asyncio.run(run())
    except DecryptionError as exc:
        sys.exit(f"rr-rotate-master-key: {exc} (is its old key in RR_OLD_MASTER_KEYS?)")
    print(f"re-wrapped {count} secret(s) under master key {settings.master_key_id}")

"""Password hashing with Argon2id (argon2-cffi), off the event loop.

Hashing is deliberately slow (tens of milliseconds, 64 MiB by default), so it runs in a worker thread and
the server keeps answering other requests meanwhile. A login for an unknown email still verifies against a
dummy hash, so it takes as long as a wrong password and the two can't be told apart by timing.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["Passwords"]


class Passwords:
    __slots__ = ("_dummy", "_hasher")

    def __init__(self, *, time_cost: int, memory_kib: int) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=1,
                                      hash_len=32, salt_len=16, type=Type.ID)
        self._dummy = self._hasher.hash("not a real password: equalizes the time of unknown-email logins")

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        """Whether `password` matches `stored` (None: no such user — still costs one verification)."""
        return await asyncio.to_thread(self._verify, stored, password)

    def _verify(self, stored: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(stored or self._dummy, password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        """True when `stored` was made with other cost parameters than the configured ones."""
        try:
            return self._hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return True

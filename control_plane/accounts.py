"""Account and org creation shared by signup, `POST /v1/orgs`, the demo seed and `rr-create-admin`."""

from __future__ import annotations

import re
import secrets
import string
import unicodedata

import asyncpg

__all__ = ["create_org", "org_code_for"]

_CODE_ALPHABET = string.ascii_lowercase + string.digits


def org_code_for(name: str) -> str:
    """A short, URL-safe, probably unique code: a slug of the name plus four random characters."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name).strip("-")[:20].strip("-") or "org"
    return f"{slug}-{''.join(secrets.choice(_CODE_ALPHABET) for _ in range(4))}"


async def create_org(conn: asyncpg.Connection, name: str, owner_user_id: int) -> asyncpg.Record:
    """Insert an org (with its zero balance row) owned by `owner_user_id`; returns the org row.

    Must run inside a transaction; a code collision is retried in a savepoint with a new code.
    """
    for _ in range(8):
        try:
            async with conn.transaction():
                org = await conn.fetchrow("insert into orgs (name, code) values ($1, $2) returning *",
                                          name, org_code_for(name))
            break
        except asyncpg.UniqueViolationError:
            continue
    else:
        raise RuntimeError("could not find a free org code")
    await conn.execute("insert into org_balances (org_id) values ($1)", org["id"])
    await conn.execute("insert into memberships (org_id, user_id, role) values ($1, $2, 'owner')",
                       org["id"], owner_user_id)
    return org

"""The audit log: who changed what, in which org, from where — with before/after of the changed fields.

Written in the same transaction as the change it describes wherever the change is a PostgreSQL write, so
there is never a change without its entry. The table refuses UPDATE, DELETE and TRUNCATE (migration 0004).
Secret fields are recorded as changed but their values as "[redacted]".
"""

from __future__ import annotations

import datetime
import ipaddress
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from control_plane.principal import Principal

__all__ = ["REDACTED", "SECRET_FIELDS", "changes", "record"]

REDACTED = "[redacted]"
SECRET_FIELDS = frozenset({"password", "password_hash", "api_key", "key", "key_hash", "secret", "credential",
                           "refresh_token", "secret_key", "webhook_secret"})


def _plain(value: Any) -> Any:
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def changes(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """{field: {"before", "after"}} for every field whose value differs (creation: before is None)."""
    before, after = before or {}, after or {}
    out = {}
    for field in sorted(set(before) | set(after)):
        old, new = _plain(before.get(field)), _plain(after.get(field))
        if old == new:
            continue
        if field in SECRET_FIELDS:
            old = None if old is None else REDACTED
            new = None if new is None else REDACTED
        out[field] = {"before": old, "after": new}
    return out


async def record(
    conn: asyncpg.Connection | asyncpg.Pool, actor: Principal, action: str, target_type: str,
    target_id: object, *, org_id: int | None, before: Mapping[str, Any] | None = None,
    after: Mapping[str, Any] | None = None,
) -> None:
    await conn.execute(
        """insert into audit_log (actor_user_id, actor_email, actor_role, org_id, action, target_type, target_id,
                                  changes, ip)
           values ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
        actor.user_id, actor.email, actor.actor_role, org_id, action, target_type,
        None if target_id is None else str(target_id), changes(before, after), actor.ip,
    )

"""Org events, written to the transactional outbox (`event_outbox`) in the writer's own transaction.

An event names what happened, never a secret or a prompt: ids, amounts in micro-USD, thresholds, times. The
notification worker reads pending rows in id order and fans them out (webhooks, mail); `dedupe_key` turns
"once per crossing / per period" into a unique constraint, so a retried writer cannot announce twice.
"""

from __future__ import annotations

import asyncpg
import orjson

EVENT_TYPES: frozenset[str] = frozenset({
    "balance.low", "balance.depleted", "payment.succeeded", "payment.failed", "key.created", "key.revoked",
    "budget.exceeded", "usage.daily",
})


class UnknownEvent(ValueError):
    """An event type outside `EVENT_TYPES`: a programming error, refused before anything is written."""


async def emit(conn: asyncpg.Connection | asyncpg.Pool, org_id: int, event_type: str, data: dict,
               *, dedupe_key: str | None = None) -> int | None:
    """Record one event for `org_id`; returns its id, or None when `dedupe_key` was already used for this org
    and type (the event was announced before). Call it inside the transaction of the change it announces."""
    if event_type not in EVENT_TYPES:
        raise UnknownEvent(event_type)
    return await conn.fetchval(
        # As text: the same on connections with and without a jsonb codec (the control plane's has one, which
        # would otherwise store the JSON text as one JSON string).
        """insert into event_outbox (org_id, event_type, payload, dedupe_key) values ($1, $2, $3::text::jsonb, $4)
           on conflict (org_id, event_type, dedupe_key) where dedupe_key is not null do nothing
           returning id""",
        org_id, event_type, orjson.dumps(data).decode(), dedupe_key,
    )

"""Low-balance detection: `balance.low` and `balance.depleted`, once per downward crossing.

Called inside every transaction that moves an org's PostgreSQL balance, after the move — the billing
flusher's batch (usage) and `record_ledger_entry` (top-ups, refunds, adjustments) — never on the proxy's
request path. The balance checked is the ledger balance (`org_balances`), which usage reaches when the
flusher writes its batch, a moment after the answer.

Exactly once per crossing, under any concurrency: those transactions all update the org's `org_balances` row
before calling this, so they hold its row lock until they commit and are serialized per org; each one sees
the balance the previous one left. An alert is *armed* while the balance is at or above its level; the
transaction that finds it armed and the balance below disarms it and emits the event, with the crossing's
number as dedupe key (a retried transaction cannot announce it twice); a later transaction that finds the
balance back at or above the level re-arms it. The level of `balance.low` is the org's
`low_balance_threshold_micros` (no alert when unset); of `balance.depleted`, zero (the balance is used up).
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from shared.notify.events import emit

__all__ = ["check_balance_alerts"]

_STATE_SQL = """
insert into balance_alert_state (org_id) select id from orgs where id = any($1::bigint[]) on conflict do nothing
"""
_READ_SQL = """
select s.org_id, s.low_armed, s.low_crossings, s.depleted_armed, s.depleted_crossings, b.balance_micros,
       o.low_balance_threshold_micros as threshold
from balance_alert_state s join org_balances b using (org_id) join orgs o on o.id = s.org_id
where s.org_id = any($1::bigint[]) order by s.org_id for update of s
"""


async def check_balance_alerts(conn: asyncpg.Connection, org_ids: Iterable[int]) -> int:
    """Arm, disarm and announce the balance alerts of `org_ids` in the caller's transaction; returns how many
    events it emitted."""
    ids = sorted({i for i in org_ids if isinstance(i, int) and 0 < i < 2**63})
    if not ids:
        return 0
    await conn.execute(_STATE_SQL, ids)
    emitted = 0
    for row in await conn.fetch(_READ_SQL, ids):
        balance, threshold = row["balance_micros"], row["threshold"]
        low_armed, low_n = row["low_armed"], row["low_crossings"]
        dep_armed, dep_n = row["depleted_armed"], row["depleted_crossings"]
        if threshold is not None and low_armed and balance < threshold:
            low_armed, low_n = False, low_n + 1
            emitted += await _emit(conn, row["org_id"], "balance.low", low_n,
                                   {"balance_micros": balance, "threshold_micros": threshold})
        elif not low_armed and (threshold is None or balance >= threshold):
            low_armed = True
        if dep_armed and balance <= 0:
            dep_armed, dep_n = False, dep_n + 1
            emitted += await _emit(conn, row["org_id"], "balance.depleted", dep_n, {"balance_micros": balance})
        elif not dep_armed and balance > 0:
            dep_armed = True
        if (low_armed, low_n, dep_armed, dep_n) != (row["low_armed"], row["low_crossings"], row["depleted_armed"],
                                                    row["depleted_crossings"]):
            await conn.execute(
                """update balance_alert_state set low_armed = $2, low_crossings = $3, depleted_armed = $4,
                          depleted_crossings = $5, updated_at = now() where org_id = $1""",
                row["org_id"], low_armed, low_n, dep_armed, dep_n)
    return emitted


async def _emit(conn: asyncpg.Connection, org_id: int, event_type: str, crossing: int, data: dict) -> int:
    event_id = await emit(conn, org_id, event_type, {**data, "crossing": crossing},
                          dedupe_key=f"crossing-{crossing}")
    return 1 if event_id is not None else 0

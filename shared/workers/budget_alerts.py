"""`budget.exceeded` events: found by the billing flusher after each batch, never on the proxy's hot path.

For every budget of the orgs in a batch, the spend of its current period is summed from `usage_records`
(what is in the ledger; in-flight reservations are not), inside the batch's own transaction, so the event
commits exactly when the spend that crossed the line does. Two levels, each emitted once per budget per
period through the outbox's `dedupe_key`:

- `soft`: the spend reached `alert_percent` of the limit (budgets without one have no soft level);
- `limit`: the spend reached the whole limit — the budget now refuses every request (the proxy may already
  have refused some a little earlier: a reservation is a request's worst case, so a request that would not
  fit is refused while the spend is still below the limit).

"Period": a calendar budget's current day, week or month in `RR_BUDGET_TIMEZONE` (`shared.budgets`); a
rolling budget's last 24 h / 7 d / 30 d, exactly (not bucketed: an alert needs no bound on Redis work), and
"once per period" for it means once per window length counted from the Unix epoch.

Cost: per batch, one statement that sums, for each budget of the batch's orgs not yet announced at the limit
this period, its period's usage records (an index range scan of `usage_records (org_id, created_at)`).
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Iterable

import asyncpg

from shared.budgets import PERIODS, ROLLING_SECONDS, BudgetCalendar
from shared.notify.events import emit

__all__ = ["emit_budget_events"]

log = logging.getLogger("rocket_relay.budgets")
_INFINITY = datetime.datetime.max.replace(tzinfo=datetime.UTC)
_SPEND_SQL = """
select b.id, b.org_id, b.api_key_id, b.period, b.window_kind, b.limit_micros, b.alert_percent, w.since, w.until,
       w.label, coalesce((select sum(u.cost_micros) from usage_records u
                          where u.org_id = b.org_id and (b.api_key_id is null or u.api_key_id = b.api_key_id)
                            and u.created_at >= w.since and u.created_at < w.until), 0)::bigint as spent
from budgets b
join unnest($2::text[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[])
     as w(period, window_kind, since, until, label)
  on w.period = b.period and w.window_kind = b.window_kind
where b.org_id = any($1::bigint[])
  -- A budget announced at the limit already this period has nothing left to announce: not summed again.
  and not exists (select 1 from event_outbox e
                   where e.org_id = b.org_id and e.event_type = 'budget.exceeded'
                     and e.dedupe_key = 'budget:' || b.id || ':' || w.label || ':limit')
order by b.id
"""


def _windows(now: float, calendar: BudgetCalendar) -> list[tuple[str, str, datetime.datetime, datetime.datetime,
                                                                    str]]:
    """(period, window, since, until, label) of every kind of budget, as of `now`."""
    def at(ts: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(ts, datetime.UTC)

    out = []
    for period in PERIODS:
        p = calendar.period(now, period)
        out.append((period, "calendar", at(p.start), at(p.end), p.label))
        window = ROLLING_SECONDS[period]
        out.append((period, "rolling", at(now - window), _INFINITY, f"r{math.floor(now / window)}"))
    return out


async def emit_budget_events(conn: asyncpg.Connection, org_ids: Iterable[int], now: float,
                             calendar: BudgetCalendar) -> int:
    """Emit the `budget.exceeded` events the orgs' spend calls for (in the caller's transaction); returns how
    many were new."""
    orgs = sorted(set(org_ids))
    if not orgs:
        return 0
    windows = _windows(now, calendar)
    rows = await conn.fetch(_SPEND_SQL, orgs, *(list(col) for col in zip(*windows, strict=True)))
    emitted = 0
    for r in rows:
        levels = []
        if r["alert_percent"] is not None:
            threshold = -(-r["limit_micros"] * r["alert_percent"] // 100)
            if r["spent"] >= threshold:
                levels.append(("soft", threshold))
        if r["spent"] >= r["limit_micros"]:
            levels.append(("limit", r["limit_micros"]))
        for level, threshold in levels:
            data = {"budget_id": r["id"], "scope": "org" if r["api_key_id"] is None else "key",
                    "api_key_id": r["api_key_id"], "period": r["period"], "window": r["window_kind"],
                    "level": level, "limit_micros": r["limit_micros"], "threshold_micros": threshold,
                    "alert_percent": r["alert_percent"], "spent_micros": r["spent"],
                    "period_start": r["since"].isoformat().replace("+00:00", "Z")}
            if r["window_kind"] == "calendar":
                data["resets_at"] = r["until"].isoformat().replace("+00:00", "Z")
            if await emit(conn, r["org_id"], "budget.exceeded", data,
                          dedupe_key=f"budget:{r['id']}:{r['label']}:{level}") is not None:
                emitted += 1
    return emitted

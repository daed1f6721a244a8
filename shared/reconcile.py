"""`rr-reconcile`: compare the live Redis balances, the billing stream backlog and the PostgreSQL ledger.

Per org it checks (1) PostgreSQL: the balance equals the sum of its balance transactions, and (2) Redis:
the live balance equals what a rebuild would set now (PostgreSQL balance - un-flushed usage events +
parked credits), computed by the rebuild script in dry-run mode. It also reports (3) billing events the
flusher held for repair because PostgreSQL refused them (unresolved `rejected_rows` of kind 'usage_event':
their ledger debit is in, their usage record is not — or, with no transaction_id, not even the debit).
Findings are reported per org; the exit code is 1 when there is any. `--repair` re-creates drifting live
balances from the ledger (held events need a person: they are not repaired here).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

import asyncpg

from shared.billing import BillingScripts, rebuild_balance
from shared.money import format_usd
from shared.redis_client import open_redis
from shared.redis_keys import RedisKeys
from shared.settings import Settings, SettingsError, load_settings

__all__ = ["Drift", "main", "reconcile"]


@dataclass(frozen=True, slots=True)
class Drift:
    org_id: int | None
    kind: str  # "ledger" (PostgreSQL balance vs transactions), "live" (Redis vs expected), "held" (see above)
    expected_micros: int
    actual_micros: int
    events: int = 0  # "held": how many events; actual_micros is their cost, expected_micros the part debited

    def __str__(self) -> str:
        if self.kind == "held":
            return (f"org {self.org_id}: {self.events} billing event(s) held for repair in rejected_rows, "
                    f"cost {format_usd(self.actual_micros)}, of which {format_usd(self.expected_micros)} "
                    "is in the ledger")
        off = format_usd(self.actual_micros - self.expected_micros)
        return (f"org {self.org_id}: {self.kind} drift: expected {format_usd(self.expected_micros)}, "
                f"found {format_usd(self.actual_micros)} (off by {off})")


async def reconcile(settings: Settings, *, repair: bool = False) -> list[Drift]:
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    redis = await open_redis(settings.redis_url, cluster=settings.redis_cluster)
    keys = RedisKeys(settings.redis_prefix, settings.billing_shards)
    scripts = BillingScripts(redis)
    drifts: list[Drift] = []
    try:
        rows = await pool.fetch(
            """select b.org_id, b.balance_micros, coalesce(sum(t.amount_micros), 0)::bigint as ledger
               from org_balances b left join balance_transactions t on t.org_id = b.org_id
               group by b.org_id, b.balance_micros order by b.org_id""")
        for row in rows:
            if row["balance_micros"] != row["ledger"]:
                drifts.append(Drift(row["org_id"], "ledger", row["ledger"], row["balance_micros"]))
            check = await rebuild_balance(pool, scripts, keys, row["org_id"], dry_run=True)
            if check is None or check.live_micros is None:
                continue  # no live balance: it will be rebuilt from the ledger on first use
            if check.live_micros != check.balance_micros:
                drifts.append(Drift(row["org_id"], "live", check.balance_micros, check.live_micros))
                if repair:
                    await redis.delete(keys.org(row["org_id"]).balance)
                    await rebuild_balance(pool, scripts, keys, row["org_id"])
        for row in await pool.fetch(
                """select org_id, count(*)::int as n, coalesce(sum(cost_micros), 0)::bigint as cost,
                          coalesce(sum(cost_micros) filter (where transaction_id is not null), 0)::bigint as debited
                   from rejected_rows where kind = 'usage_event' and resolved_at is null
                   group by org_id order by org_id nulls first"""):
            drifts.append(Drift(row["org_id"], "held", row["debited"], row["cost"], row["n"]))
    finally:
        await redis.aclose()
        await pool.close()
    return drifts


def main() -> None:
    parser = argparse.ArgumentParser(prog="rr-reconcile", description=__doc__.split("\n")[0])
    parser.add_argument("--repair", action="store_true", help="re-create drifting live balances from the ledger")
    args = parser.parse_args()
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.exit(f"rr-reconcile: {exc}")
    drifts = asyncio.run(reconcile(settings, repair=args.repair))
    for drift in drifts:
        print(drift)
    print(f"{len(drifts)} drift(s) found" + (" and repaired" if args.repair and drifts else ""))
    sys.exit(1 if drifts else 0)


if __name__ == "__main__":
    main()

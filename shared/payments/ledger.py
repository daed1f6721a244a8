"""Ledger entries of payments, and the outbox that carries them to the live balance.

A payment's ledger row is written in the same transaction as the payment's own state (and, for Stripe, the
event's "processed" mark), together with a `pending_live_credits` row. After the commit the live balance
is credited and the outbox row removed; if the process dies in between, `retry_live_credits` (rr-worker)
applies it later. The credit script is idempotent on the transaction id, so applying twice changes nothing.
"""

from __future__ import annotations

import logging

import asyncpg

from shared.billing import BillingScripts, LedgerResult, apply_live_credit, record_ledger_entry
from shared.redis_keys import RedisKeys

__all__ = [
    "MICROS_PER_CENT",
    "NotWholeCents",
    "cents_to_micros",
    "flush_live_credits",
    "ledger_entry",
    "micros_to_cents",
    "retry_live_credits",
]

log = logging.getLogger("rocket_relay.payments")

MICROS_PER_CENT = 10_000  # 1 USD = 100 cents = 1,000,000 micro-units
# Outbox rows older than this are left to the reconciler: the credit script remembers applied transaction
# ids for two hours, so a retry this late could no longer tell whether it ran before.
_LIVE_RETRY_MAX_AGE_S = 3600


class NotWholeCents(ValueError):
    """An amount in micro-units that Stripe (whole cents) cannot charge exactly."""


def cents_to_micros(cents: int) -> int:
    if not isinstance(cents, int) or isinstance(cents, bool):
        raise TypeError("cents must be an int")
    return cents * MICROS_PER_CENT


def micros_to_cents(micros: int) -> int:
    cents, rest = divmod(micros, MICROS_PER_CENT)
    if rest:
        raise NotWholeCents(f"{micros} micro-units is not a whole number of cents")
    return cents


async def ledger_entry(conn: asyncpg.Connection, org_id: int, kind: str, amount_micros: int, external_id: str,
                       reason: str, *, actor_user_id: int | None = None) -> LedgerResult:
    """One ledger row (idempotent on kind + external id) and its outbox row, in the caller's transaction."""
    result = await record_ledger_entry(conn, org_id, kind, amount_micros, external_id=external_id, reason=reason,
                                       actor_user_id=actor_user_id)
    if result.created:
        await conn.execute("insert into pending_live_credits (transaction_id) values ($1)", result.transaction_id)
    return result


async def flush_live_credits(pool: asyncpg.Pool, scripts: BillingScripts, keys: RedisKeys,
                             transaction_ids: list[int]) -> None:
    """Apply committed ledger rows to the live balances and clear their outbox rows. A Redis failure leaves
    the rows for `retry_live_credits`."""
    if not transaction_ids:
        return
    rows = await pool.fetch(
        """select t.id, t.org_id, t.amount_micros from pending_live_credits p
           join balance_transactions t on t.id = p.transaction_id where p.transaction_id = any($1::bigint[])""",
        transaction_ids)
    for row in rows:
        try:
            await apply_live_credit(scripts, keys, row["org_id"], row["id"], row["amount_micros"])
        except (OSError, ConnectionError, TimeoutError) as exc:
            log.warning("live balance of org %d not updated yet (%s); rr-worker retries", row["org_id"],
                        type(exc).__name__)
            continue
        await pool.execute("delete from pending_live_credits where transaction_id = $1", row["id"])


async def retry_live_credits(pool: asyncpg.Pool, scripts: BillingScripts, keys: RedisKeys, *,
                             min_age_s: float = 5.0) -> int:
    """Apply outbox rows a process left behind (older than `min_age_s`, so as not to race the process that
    is about to apply them itself — harmless anyway); returns how many it applied."""
    stale = await pool.fetch(
        """delete from pending_live_credits where created_at < now() - make_interval(secs => $1)
           returning transaction_id""", _LIVE_RETRY_MAX_AGE_S)
    for row in stale:
        log.warning("ledger transaction %d never reached the live balance; run rr-reconcile", row["transaction_id"])
    ids = await pool.fetch(
        "select transaction_id from pending_live_credits where created_at < now() - make_interval(secs => $1)",
        min_age_s)
    await flush_live_credits(pool, scripts, keys, [r["transaction_id"] for r in ids])
    return len(ids)

"""The billing primitives shared by the proxy, the flusher, the control plane and the reconciler.

- `BillingScripts`: the Lua scripts (in `shared/lua/`), loaded once per client and called by SHA
  (redis-py's `Script` re-loads them on NOSCRIPT).
- `reserve_entry` / `settle_entry` / `batch_call`: the keys and arguments of the two hot-path scripts (each
  call carries one or more requests), in one place.
- `UsageEvent`: what the settle script appends to the billing stream, msgpack-encoded.
- `rebuild_balance`: (re)creates an org's live Redis balance from PostgreSQL plus un-flushed events.
- `apply_ledger_entry`: top-ups and adjustments: PostgreSQL ledger first, then the live balance
  (`record_ledger_entry` + `apply_live_credit` when the ledger row joins a larger transaction).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from shared.notify.alerts import check_balance_alerts
from shared.redis_keys import OrgKeys, RedisKeys

__all__ = [
    "CREDIT_KINDS",
    "RECOVERED_USAGE_REASON",
    "RESERVE_SWEEP_ARG",
    "BillingScripts",
    "ExternalIdTaken",
    "LedgerResult",
    "RebuildResult",
    "UsageEvent",
    "apply_ledger_entry",
    "apply_live_credit",
    "batch_call",
    "lua_source",
    "rebuild_balance",
    "record_ledger_entry",
    "reserve_call",
    "reserve_entry",
    "settle_call",
    "settle_entry",
]

_LUA = Path(__file__).with_name("lua")
CREDIT_KINDS = ("topup", "refund", "adjustment", "payment_reversal")
# The reason of the 'usage' transactions of usage recovered from the request log (shared/workers/recovery.py).
# Unlike the flusher's, they reach the live balance the way credits do (`apply_live_credit`), so a rebuild
# must know which of them its snapshot holds already.
RECOVERED_USAGE_REASON = "usage recovered"


class UsageEvent(msgspec.Struct, frozen=True, array_like=True):
    """One billed request, as appended to the billing stream by the settle script."""

    request_id: str
    created_us: int  # when the request started (unix µs): the price in force then applies
    org_id: int
    api_key_id: int
    model: str
    provider: str | None
    route_id: int | None
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    price_id: int | None
    byok: bool = False
    uncharged_micros: int = 0  # the cost beyond the reservation, not charged (see proxy.bounds)
    # The components of prompt_tokens and completion_tokens (totals) that are billed apart (shared.usage).
    cached_input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    input_image_tokens: int = 0
    input_audio_tokens: int = 0
    output_image_tokens: int = 0
    output_audio_tokens: int = 0
    service_tier: str | None = None
    estimated: bool = False  # no usage from the upstream (a stream cut short): estimated by the relay


def reserve_entry(org: OrgKeys, request_id: str, amount: int, est_tokens: int, key_id: int,
                  limits: tuple[int, int, int, int], now_ms: int, ttl_ms: int, spend_key: str, spend_cap: int,
                  sweep: bool, budget_keys: list[str], budget_args: list) -> tuple[list, list]:
    """The KEYS and ARGV of one request in a `reserve.lua` call. `limits`: key rpm, key tpm, org rpm, org tpm
    (0: none); `budget_args`: four per budget key (see the script)."""
    return ([org.balance, org.reservations, spend_key, *budget_keys],
            [len(budget_keys), request_id, amount, est_tokens, key_id, *limits, now_ms, ttl_ms, spend_cap,
             now_ms // 60_000, 1 if sweep else 0, *budget_args])


RESERVE_SWEEP_ARG = 13  # where `sweep` is in a `reserve_entry`'s ARGV


def settle_entry(org: OrgKeys, request_id: str, held: int, cost: int, token_delta: int, key_id: int,
                 epoch: str, payload: bytes, window: int, spend_key: str, spend_capped: bool,
                 budget_keys: list[str], budget_buckets: list[str]) -> tuple[list, list]:
    """The KEYS and ARGV of one request in a `settle.lua` call: `held` is what its reservation holds (it
    names it), `window` the minute it was counted in, `payload` the encoded UsageEvent (b"": release only)."""
    return ([org.balance, org.reservations, org.stream, spend_key, *budget_keys],
            [len(budget_keys), request_id, held, cost, token_delta, key_id, org.org_id, epoch, payload, window,
             1 if spend_capped else 0, *budget_buckets])


def batch_call(entries: list[tuple[list, list]]) -> tuple[list, list]:
    """One `reserve.lua` or `settle.lua` call for several requests' entries (of one shard: their keys share
    a cluster slot); its reply is one answer per entry, in order."""
    keys: list = []
    args: list = [len(entries)]
    for entry_keys, entry_args in entries:
        keys += entry_keys
        args += entry_args
    return keys, args


def reserve_call(*entry: Any) -> tuple[list, list]:
    """A `reserve.lua` call for one request (the arguments of `reserve_entry`)."""
    return batch_call([reserve_entry(*entry)])


def settle_call(*entry: Any) -> tuple[list, list]:
    """A `settle.lua` call for one request (the arguments of `settle_entry`)."""
    return batch_call([settle_entry(*entry)])


def lua_source(name: str) -> str:
    """The text of one of the billing scripts in `shared/lua/`."""
    return (_LUA / f"{name}.lua").read_text()


class BillingScripts:
    """The billing Lua scripts registered on one Redis client."""

    def __init__(self, redis: Redis) -> None:
        def load(name: str):
            return redis.register_script(lua_source(name))

        self.reserve = load("reserve")
        self.settle = load("settle")
        self.rebuild = load("rebuild")
        self.credit = load("credit")


@dataclass(frozen=True, slots=True)
class RebuildResult:
    created: bool  # false: a live balance already existed (or dry run)
    balance_micros: int  # what the live balance is (or, dry run: should be)
    live_micros: int | None = None  # dry run: what Redis holds now
    unflushed_events: int = 0


async def _snapshot(pool: asyncpg.Pool, org_id: int, shard: int) -> tuple[int, int, str, list[str]] | None:
    """The org's PostgreSQL balance, credit limit, the shard's flush watermark and the ids of its recent
    transactions that are applied to live balances apart from the stream (credits, recovered usage), read in
    one snapshot (so the watermark and the balance agree)."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(
            """select b.balance_micros, o.credit_limit_micros from org_balances b
               join orgs o on o.id = b.org_id where b.org_id = $1""", org_id)
        if row is None:
            return None
        mark = await conn.fetchrow("select last_ms, last_seq from billing_watermarks where shard = $1", shard)
        credits = await conn.fetch(
            """select id from balance_transactions where org_id = $1
               and (kind <> 'usage' or reason = $2) and created_at > now() - interval '1 hour'""",
            org_id, RECOVERED_USAGE_REASON)
    watermark = f"{mark['last_ms']}-{mark['last_seq']}" if mark else "0-0"
    return row["balance_micros"], row["credit_limit_micros"], watermark, [str(r["id"]) for r in credits]


async def rebuild_balance(pool: asyncpg.Pool, scripts: BillingScripts, keys: RedisKeys, org_id: int,
                          *, dry_run: bool = False) -> RebuildResult | None:
    """Create the org's live balance unless it exists; None if the org has no balance row."""
    org = keys.org(org_id)
    snap = await _snapshot(pool, org_id, org.shard)
    if snap is None:
        return None
    pg_balance, credit_limit, watermark, included = snap
    reply = await scripts.rebuild(
        keys=[org.balance, org.reservations, org.stream, org.pending_credits, org.applied_credits],
        args=[pg_balance, credit_limit, watermark, org_id, os.urandom(6).hex(), "1" if dry_run else "0", *included],
    )
    if reply[0] == 0:
        return RebuildResult(False, pg_balance)
    if reply[0] == 2:
        live = int(reply[2]) if reply[2] else None
        return RebuildResult(False, int(reply[1]), live, int(reply[3]))
    return RebuildResult(True, int(reply[1]))


class ExternalIdTaken(ValueError):
    """The external id (a payment or adjustment id) was already recorded for another org."""


@dataclass(frozen=True, slots=True)
class LedgerResult:
    transaction_id: int
    created: bool  # false: the external id was seen before; nothing changed


async def record_ledger_entry(
    conn: asyncpg.Connection, org_id: int, kind: str, amount_micros: int, *, external_id: str | None = None,
    reason: str | None = None, actor_user_id: int | None = None,
) -> LedgerResult:
    """The PostgreSQL half of `apply_ledger_entry`, inside the caller's transaction on `conn`: one ledger
    row and the balance row, idempotent on (kind, external_id). After the commit, the caller applies the
    created transaction to the live balance (`apply_live_credit`)."""
    if kind not in CREDIT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(CREDIT_KINDS)}")
    if not isinstance(amount_micros, int) or isinstance(amount_micros, bool):
        raise TypeError("amount_micros must be an int (micro-units)")
    txn_id = await conn.fetchval(
        """insert into balance_transactions (org_id, kind, amount_micros, external_id, reason, actor_user_id)
           values ($1, $2, $3, $4, $5, $6) on conflict do nothing returning id""",
        org_id, kind, amount_micros, external_id, reason, actor_user_id,
    )
    if txn_id is None:
        existing = await conn.fetchrow(
            "select id, org_id from balance_transactions where kind = $1 and external_id = $2", kind, external_id)
        if existing["org_id"] != org_id:
            # The same payment id credited to another org is a caller's bug, never an "already done".
            raise ExternalIdTaken(f"external id {external_id!r} belongs to another org's {kind}")
        return LedgerResult(existing["id"], False)
    await conn.execute(
        "update org_balances set balance_micros = balance_micros + $2, updated_at = now() where org_id = $1",
        org_id, amount_micros,
    )
    # A top-up re-arms the org's balance alerts; a debit (refund, adjustment) may cross one.
    await check_balance_alerts(conn, [org_id])
    return LedgerResult(txn_id, True)


async def apply_live_credit(scripts: BillingScripts, keys: RedisKeys, org_id: int, transaction_id: int,
                            amount_micros: int) -> None:
    """Apply a committed ledger transaction to the org's live balance (idempotent on the transaction id)."""
    org = keys.org(org_id)
    await scripts.credit(keys=[org.balance, org.pending_credits, org.applied_credits],
                         args=[transaction_id, amount_micros])


async def apply_ledger_entry(
    pool: asyncpg.Pool, scripts: BillingScripts, keys: RedisKeys, org_id: int, kind: str, amount_micros: int,
    *, external_id: str | None = None, reason: str | None = None, actor_user_id: int | None = None,
) -> LedgerResult:
    """Record a balance change in the PostgreSQL ledger, then apply it to the live Redis balance.

    Idempotent on (kind, external_id): a repeated top-up returns the first transaction and changes nothing.
    If Redis can't be reached after the commit, the ledger still holds the change and the reconciler
    reports (and `--repair` fixes) the live balance.
    """
    async with pool.acquire() as conn, conn.transaction():
        result = await record_ledger_entry(conn, org_id, kind, amount_micros, external_id=external_id,
                                           reason=reason, actor_user_id=actor_user_id)
    if result.created:
        await apply_live_credit(scripts, keys, org_id, result.transaction_id, amount_micros)
    return result

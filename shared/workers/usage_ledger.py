"""The one way usage reaches the ledger: usage records and their 'usage' balance transactions, in one
statement.

Both writers of usage records use it — the billing flusher (events from the stream) and the usage recovery
(billed answers whose event Redis lost, from the request log) — so they dedupe against each other on the
usage record's key (created_at, request_id): a record either writer inserted first makes the other's
`on conflict do nothing` skip it, and only the rows actually inserted are debited. That is what keeps
"one usage record and one ledger effect per billed answer" when both see the same answer.
"""

from __future__ import annotations

import re

__all__ = ["USAGE_COLUMNS", "usage_ledger_sql"]

# The usage_records columns a writer supplies (transaction_id and recovered are the statement's own).
USAGE_COLUMNS = ("created_at", "request_id", "org_id", "api_key_id", "model", "provider", "route_id",
                 "prompt_tokens", "completion_tokens", "cost_micros", "price_id", "byok", "uncharged_micros",
                 "cached_input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "reasoning_tokens",
                 "input_image_tokens", "input_audio_tokens", "output_image_tokens", "output_audio_tokens",
                 "service_tier", "estimated")


def usage_ledger_sql(source: str, reason: str, *, recovered: bool = False) -> str:
    """The statement writing the rows of the query `source` (a select yielding `USAGE_COLUMNS` by name):

        usage_records  insert ... on conflict do nothing      -- a record written before changes nothing
        one 'usage' balance_transaction per org for the rows actually inserted (request_count = their number)
        org_balances  += those (negative) amounts

    It returns the ledger rows it created: (id, org_id, amount_micros, request_count). `reason` goes on them."""
    if not re.fullmatch(r"[a-z ]{1,40}", reason):
        raise ValueError("reason must be a few lower-case words")
    columns = ", ".join(USAGE_COLUMNS)
    picked = ", ".join(f"s.{c}" for c in USAGE_COLUMNS)
    return f"""
with src as ({source}), txn as (
    select org_id, nextval(pg_get_serial_sequence('balance_transactions', 'id')) as id
    from (select distinct org_id from src) o
), ins as (
    insert into usage_records ({columns}, recovered, transaction_id)
    select {picked}, {'true' if recovered else 'false'}, t.id from src s join txn t using (org_id)
    on conflict do nothing
    returning org_id, transaction_id, cost_micros
), agg as (
    select org_id, transaction_id, sum(cost_micros)::bigint as total, count(*)::int as n from ins group by 1, 2
), ledger as (
    insert into balance_transactions (id, org_id, kind, amount_micros, request_count, reason)
    select transaction_id, org_id, 'usage', -total, n, '{reason}' from agg
    returning id, org_id, amount_micros, request_count
), bal as (
    update org_balances b set balance_micros = b.balance_micros + l.amount_micros, updated_at = now()
    from ledger l where b.org_id = l.org_id
)
select id, org_id, amount_micros, request_count from ledger
"""

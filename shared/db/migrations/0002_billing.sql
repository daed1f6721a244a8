-- Billing ledger plumbing: usage records point at the ledger row that debited them, ledger rows count the
-- requests they cover, and the flusher records per stream shard how far it has durably written.

alter table usage_records add column transaction_id bigint;
alter table balance_transactions add column request_count integer;

-- Everything of billing stream shard `shard` up to (last_ms, last_seq) is in PostgreSQL, and nothing after
-- it: the flusher of a shard writes its events in stream order (one lease holder per shard).
create table billing_watermarks (
    shard      integer primary key,
    last_ms    bigint not null,
    last_seq   bigint not null,
    updated_at timestamptz not null default now()
);

-- Every org has a balance row from birth, so ledger writers can update rather than upsert.
insert into org_balances (org_id) select id from orgs on conflict do nothing;

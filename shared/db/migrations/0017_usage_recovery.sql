-- Usage recovered from the request log (shared/workers/recovery.py): billed answers whose usage event was
-- lost with Redis's data before the flusher wrote it. Such a record has the request log's totals and cost
-- but not what only the event carried (token components, price id, uncharged cost, service tier), so it
-- says it was recovered.
alter table usage_records add column recovered boolean not null default false;

-- Per billing shard, how far the usage recovery has looked: request logs of the shard's orgs started before
-- `checked_to` have a usage record, or were recovered, or were not billed.
create table usage_recovery_cursors (
    shard      integer primary key,
    checked_to timestamptz not null,
    updated_at timestamptz not null default now()
);

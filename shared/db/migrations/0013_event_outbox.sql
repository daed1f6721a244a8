-- The transactional outbox of org events (issue: notifications). A writer inserts the event in the same
-- transaction as the change it announces (a payment credited, a key revoked, a budget crossed), so an event
-- exists exactly when its change committed; the notification worker fans each one out to the org's webhook
-- endpoints and mail and marks it dispatched. `dedupe_key` makes "once per crossing" a constraint, not a hope.
create table if not exists event_outbox (
    id            bigint generated always as identity primary key,
    org_id        bigint not null references orgs(id) on delete cascade,
    event_type    text not null,
    payload       jsonb not null default '{}',
    dedupe_key    text,
    created_at    timestamptz not null default now(),
    dispatched_at timestamptz
);
create unique index if not exists event_outbox_dedupe on event_outbox (org_id, event_type, dedupe_key)
    where dedupe_key is not null;
create index if not exists event_outbox_pending on event_outbox (id) where dispatched_at is null;
